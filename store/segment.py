"""Segment files: one immutable, checksummed file per segment holding both modalities' codes.

Layout (little-endian), version 1:

    0    header (96 bytes): magic "CMHSEG01", version (u32), n_bits (u32), n rows (u64), words
         per code (u32), 4 zero bytes, then u64 offsets of the seqs, image codes and text codes
         sections, their CRC-32s (u32 each), 24 zero bytes and the CRC-32 of bytes 0..91 (u32)
    96   seqs: n int64, strictly ascending (the rows' insertion sequence numbers)
    ..   image codes: n * words uint64, then text codes: n * words uint64 (each 64-byte aligned)

The modality of each section is fixed by its place in the header, so codes of one modality can
never be served as the other's; the store's SQLite commit point records each segment's size and
header CRC, so a file swapped for another segment's is refused. Written with common/fsio's atomic
write (temp file, fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from common.errors import InputError
from common.fsio import atomic_write
from indexes.codes import MAX_BITS, MIN_BITS, check_packed, n_words

MAGIC = b"CMHSEG01"
VERSION = 1
HEADER = struct.Struct("<8sIIQI4xQQQIII24xI")
HEADER_SIZE = 96
ALIGN = 64
assert HEADER.size == HEADER_SIZE


@dataclass(frozen=True)
class SegmentData:
    """A segment's rows: seqs (n,) int64 ascending, image and text codes (n, words) uint64."""

    seqs: np.ndarray
    image_codes: np.ndarray
    text_codes: np.ndarray

    def __len__(self) -> int:
        return int(self.seqs.shape[0])


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _offsets(n: int, words: int) -> tuple[int, int, int, int]:
    seqs_at = HEADER_SIZE
    image_at = _aligned(seqs_at + 8 * n)
    text_at = _aligned(image_at + 8 * n * words)
    return seqs_at, image_at, text_at, text_at + 8 * n * words


def write_segment(path: Path, *, n_bits: int, data: SegmentData) -> int:
    """Write `data` to `path` atomically and durably; returns the header CRC (its identity)."""
    n, words = len(data), n_words(n_bits)
    check_packed(data.image_codes, n_bits, name="image codes")
    check_packed(data.text_codes, n_bits, name="text codes")
    if data.image_codes.shape[0] != n or data.text_codes.shape[0] != n:
        raise InputError(f"expected {n} codes per modality, got a mismatch")
    if n > 1 and not bool(np.all(data.seqs[1:] > data.seqs[:-1])):
        raise InputError("expected strictly ascending seqs in a segment")
    seqs = np.ascontiguousarray(data.seqs, dtype="<i8")
    image = np.ascontiguousarray(data.image_codes, dtype="<u8")
    text = np.ascontiguousarray(data.text_codes, dtype="<u8")
    seqs_at, image_at, text_at, end = _offsets(n, words)
    fields = (
        MAGIC,
        VERSION,
        n_bits,
        n,
        words,
        seqs_at,
        image_at,
        text_at,
        zlib.crc32(seqs.data),
        zlib.crc32(image.data),
        zlib.crc32(text.data),
    )
    head = HEADER.pack(*fields, 0)
    crc = zlib.crc32(head[:92])
    head = HEADER.pack(*fields, crc)

    def write(f: BinaryIO) -> None:
        f.write(head)
        f.write(seqs.data)
        f.write(b"\0" * (image_at - seqs_at - seqs.nbytes))
        f.write(image.data)
        f.write(b"\0" * (text_at - image_at - image.nbytes))
        f.write(text.data)

    atomic_write(path, write)
    assert path.stat().st_size == end
    return crc


def read_segment(path: Path, *, n_bits: int, expect_rows: int, expect_crc: int) -> SegmentData:
    """Memory-map and check a segment file; InputError naming the file and what is wrong."""
    if not path.is_file():
        raise InputError(f"expected segment file {path}, it is missing")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE or head[:8] != MAGIC:
        raise InputError(f"expected a segment file starting with {MAGIC!r}: {path}")
    magic, version, bits, n, words, seqs_at, image_at, text_at, c_seqs, c_img, c_txt, crc = (
        HEADER.unpack(head)
    )
    if version != VERSION:
        raise InputError(f"expected segment format version {VERSION}, got {version}: {path}")
    if zlib.crc32(head[:92]) != crc:
        raise InputError(f"expected a header with a valid checksum, got a corrupted one: {path}")
    if crc != expect_crc or n != expect_rows:
        raise InputError(
            f"expected the segment recorded in the store ({expect_rows} rows, header crc "
            f"{expect_crc:#010x}), got {n} rows, crc {crc:#010x}: {path} was replaced"
        )
    if bits != n_bits or not MIN_BITS <= bits <= MAX_BITS or words != n_words(bits):
        raise InputError(f"expected {n_bits}-bit codes, got {bits} bits: {path}")
    expected = _offsets(n, words)
    if (seqs_at, image_at, text_at) != expected[:3] or size != expected[3]:
        raise InputError(f"expected {expected[3]} bytes for {n} rows, got {size}: {path}")
    if n == 0:
        empty = np.empty((0, words), np.uint64)
        return SegmentData(np.empty(0, np.int64), empty, empty.copy())
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    seqs = mapped[seqs_at : seqs_at + 8 * n].view("<i8")
    image = mapped[image_at : image_at + 8 * n * words].view("<u8").reshape(n, words)
    text = mapped[text_at : text_at + 8 * n * words].view("<u8").reshape(n, words)
    for name, arr, want in (("seqs", seqs, c_seqs), ("image", image, c_img), ("text", text, c_txt)):
        if zlib.crc32(arr.data) != want:
            raise InputError(
                f"expected {name} section checksum {want:#010x}, got corrupted: {path}"
            )
    return SegmentData(
        np.asarray(seqs).view(np.int64),
        np.asarray(image).view(np.uint64),
        np.asarray(text).view(np.uint64),
    )
