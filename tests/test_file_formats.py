"""store/sections.py, the one header of the store's segment files and of the earlier design's
Hamming index files: files written before it read back and are written again byte for byte, a
round trip keeps every array, and a truncated, corrupted or foreign file is refused naming the
problem and the file (the segment files' own corruption matrix is in tests/test_store.py)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from common.errors import InputError
from indexes.codes import pack_codes
from store import sections
from store.legacy import INDEX_LAYOUT, read_index
from store.segment import LAYOUT, SegmentData, read_segment, write_segment
from tests.helpers import write_legacy_index

DATA = Path(__file__).parent / "data"
HEADER_SIZE = INDEX_LAYOUT.header_size


def fixed_codes(seed: int) -> np.ndarray:
    """The codes tests/data/make_files_v1.py wrote: 5 of 72 bits from a fixed generator."""
    return pack_codes(np.random.default_rng(seed).integers(0, 2, size=(5, 72)))


def test_a_segment_file_of_format_1_reads_back_and_is_written_again_byte_for_byte(
    tmp_path: Path,
) -> None:
    golden = DATA / "segment-v1.seg"
    data = read_segment(golden, n_bits=72, expect_rows=5, expect_crc=0x859A00DF)
    np.testing.assert_array_equal(data.seqs, [3, 4, 9, 10, 11])
    np.testing.assert_array_equal(data.image_codes, fixed_codes(1))
    np.testing.assert_array_equal(data.text_codes, fixed_codes(2))
    again = tmp_path / "again.seg"
    assert write_segment(again, n_bits=72, data=data) == 0x859A00DF
    assert again.read_bytes() == golden.read_bytes()


def test_a_hamming_index_file_of_format_1_reads_back_and_is_written_again_byte_for_byte(
    tmp_path: Path,
) -> None:
    golden = DATA / "index-v1.hidx"
    n_bits, ids, codes = read_index(golden)
    assert n_bits == 72
    np.testing.assert_array_equal(ids, [50, 7, 12, 99, 0])
    np.testing.assert_array_equal(codes, fixed_codes(1))
    write_legacy_index(tmp_path / "again.hidx", n_bits=72, ids=ids, codes=codes)
    assert (tmp_path / "again.hidx").read_bytes() == golden.read_bytes()


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize(("n", "n_bits"), [(0, 64), (1, 16), (333, 128), (50, 200)])
def test_a_round_trip_keeps_every_array(tmp_path: Path, n: int, n_bits: int, mmap: bool) -> None:
    rng = np.random.default_rng(n)
    seqs = np.cumsum(rng.integers(1, 5, size=n)).astype(np.int64)
    image = pack_codes(rng.integers(0, 2, size=(n, n_bits)))
    text = pack_codes(rng.integers(0, 2, size=(n, n_bits)))
    path = tmp_path / "part.seg"
    crc = sections.write(path, LAYOUT, n_bits=n_bits, arrays=[seqs, image, text])
    header = sections.read_header(path, LAYOUT)
    assert (header.n_bits, header.n, header.crc) == (n_bits, n, crc)
    got = sections.read_sections(path, LAYOUT, header, mmap=mmap)
    for got_array, want in zip(got, (seqs, image, text), strict=True):
        np.testing.assert_array_equal(got_array, want)
    assert got[0].dtype == np.int64 and got[1].dtype == got[2].dtype == np.uint64
    assert not list(tmp_path.glob("*.tmp"))
    # What a store keeps of a segment reads back the same (read_segment memory-maps it).
    data = read_segment(path, n_bits=n_bits, expect_rows=n, expect_crc=crc)
    assert isinstance(data, SegmentData) and len(data) == n


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "image.hidx"
    codes = pack_codes(rng.integers(0, 2, size=(100, 128)))
    write_legacy_index(path, n_bits=128, ids=rng.permutation(301)[:100], codes=codes)
    return path


@pytest.mark.parametrize("keep", [0, 5, 40, HEADER_SIZE + 17, HEADER_SIZE + 800 + 8])
def test_truncated_files_are_rejected(saved: Path, keep: int) -> None:
    saved.write_bytes(saved.read_bytes()[:keep])
    with pytest.raises(InputError, match="truncated") as refusal:
        read_index(saved)
    assert str(saved) in str(refusal.value)


def test_trailing_bytes_are_rejected(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes() + b"\0")
    with pytest.raises(InputError, match="with trailing bytes"):
        read_index(saved)


@pytest.mark.parametrize(
    ("offset", "message"),
    [(20, "corrupted header"), (HEADER_SIZE + 3, "corrupted ids"), (-5, "corrupted codes")],
)
def test_flipped_bytes_are_detected(saved: Path, offset: int, message: str) -> None:
    data = bytearray(saved.read_bytes())
    data[offset] ^= 0x10
    saved.write_bytes(bytes(data))
    with pytest.raises(InputError, match=message):
        read_index(saved)


def test_other_versions_are_rejected(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    struct.pack_into("<I", data, 8, 2)
    struct.pack_into("<I", data, 60, zlib.crc32(bytes(data[:60])))
    saved.write_bytes(bytes(data))
    with pytest.raises(InputError, match="expected Hamming index file version 1, got version 2"):
        read_index(saved)


def test_foreign_and_missing_files_are_rejected(tmp_path: Path) -> None:
    foreign = tmp_path / "notes.txt"
    foreign.write_text("hello, this is not an index at all, but it is long enough" * 3)
    with pytest.raises(InputError, match="expected a Hamming index file starting with"):
        read_index(foreign)
    with pytest.raises(InputError, match="expected a Hamming index file at .* it is missing"):
        read_index(tmp_path / "missing.hidx")
