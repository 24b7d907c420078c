"""Index files: save -> load identity; clear errors for truncated, corrupted or foreign files."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from common.errors import InputError
from indexes.codes import pack_codes
from indexes.hamming import HammingIndex
from indexes.storage import HEADER_SIZE

ROOT = Path(__file__).resolve().parents[1]


def build(n: int, n_bits: int, seed: int = 0) -> HammingIndex:
    """An index of n random codes under shuffled ids."""
    rng = np.random.default_rng(seed)
    index = HammingIndex(n_bits)
    codes = pack_codes(rng.integers(0, 2, size=(n, n_bits), dtype=np.uint8))
    index.add(codes, rng.permutation(3 * n + 1)[:n].astype(np.int64))
    return index


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize(("n", "n_bits"), [(0, 64), (1, 16), (333, 128), (50, 200)])
def test_save_load_gives_identical_results(tmp_path: Path, n: int, n_bits: int, mmap: bool) -> None:
    index = build(n, n_bits)
    path = tmp_path / "index.cmh"
    index.save(path)
    loaded = HammingIndex.load(path, mmap=mmap)
    assert loaded.n_bits == n_bits and len(loaded) == n
    np.testing.assert_array_equal(loaded.ids, index.ids)
    np.testing.assert_array_equal(loaded.codes, index.codes)
    queries = pack_codes(np.random.default_rng(9).integers(0, 2, size=(7, n_bits)))
    for got, want in zip(loaded.search(queries, 10), index.search(queries, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    # A loaded (possibly memory-mapped) index still takes additions and removals.
    loaded.add(queries[:1], np.array([10**9], dtype=np.int64))
    assert loaded.remove(np.array([10**9], dtype=np.int64)) == 1
    assert not list(tmp_path.glob("*.tmp"))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "index.cmh"
    build(100, 128).save(path)
    return path


@pytest.mark.parametrize("keep", [0, 5, 40, HEADER_SIZE + 17, HEADER_SIZE + 800 + 8])
def test_truncated_files_are_rejected(saved: Path, keep: int) -> None:
    saved.write_bytes(saved.read_bytes()[:keep])
    with pytest.raises(InputError, match="truncated"):
        HammingIndex.load(saved)


def test_trailing_bytes_are_rejected(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes() + b"\0")
    with pytest.raises(InputError, match="with trailing bytes"):
        HammingIndex.load(saved)


@pytest.mark.parametrize(
    ("offset", "message"),
    [(20, "corrupted header"), (HEADER_SIZE + 3, "corrupted ids"), (-5, "corrupted codes")],
)
def test_flipped_bytes_are_detected(saved: Path, offset: int, message: str) -> None:
    data = bytearray(saved.read_bytes())
    data[offset] ^= 0x10
    saved.write_bytes(bytes(data))
    with pytest.raises(InputError, match=message):
        HammingIndex.load(saved, mmap=False)


def test_other_versions_are_rejected(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    struct.pack_into("<I", data, 8, 2)
    struct.pack_into("<I", data, 60, zlib.crc32(bytes(data[:60])))
    saved.write_bytes(bytes(data))
    with pytest.raises(InputError, match="expected index format version 1, got version 2"):
        HammingIndex.load(saved)


def test_foreign_and_missing_files_are_rejected(tmp_path: Path) -> None:
    foreign = tmp_path / "notes.txt"
    foreign.write_text("hello, this is not an index at all, but it is long enough" * 3)
    with pytest.raises(InputError, match="expected a Hamming index file starting with"):
        HammingIndex.load(foreign)
    with pytest.raises(InputError, match="expected an index file at"):
        HammingIndex.load(tmp_path / "missing.cmh")


SAVER = """
import sys
from pathlib import Path
import numpy as np
from indexes.hamming import HammingIndex
index = HammingIndex(1024)
n = 60_000
index.add(np.zeros((n, 16), dtype=np.uint64), np.arange(n, dtype=np.int64))
print("ready", flush=True)
while True:
    index.save(Path(sys.argv[1]))
"""


def test_a_killed_save_leaves_a_loadable_file(saved: Path) -> None:
    old = HammingIndex.load(saved)
    saver = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(saved)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    assert saver.stdout is not None
    assert saver.stdout.readline().strip() == b"ready"
    time.sleep(0.3)  # several saves of ~8 MB each are under way; kill one of them midway
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    loaded = HammingIndex.load(saved)  # either the old file or a complete new one
    assert len(loaded) in (len(old), 60_000)
