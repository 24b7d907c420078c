"""The Hamming index file format (version 1): atomic writes and a load that checks everything.

Layout, all little-endian:

    0   header (64 bytes): struct HEADER below
        magic "CMHHAMIX", format version (u32), n_bits (u32), n codes (u64), words per code
        (u32), reserved (u32, 0), ids offset (u64), codes offset (u64), CRC-32 of the ids
        bytes (u32), CRC-32 of the codes bytes (u32), 4 zero bytes, CRC-32 of bytes 0..59 (u32)
    64  ids: n int64
        zero padding to a multiple of 64 bytes (so the codes can be memory-mapped aligned)
    ..  codes: n * words uint64, packed as in indexes/codes.py

A save goes through common.fsio.atomic_write (temporary file, fsync, rename, fsync of the
folder): a crash at any point leaves either the old file or the new one, both whole.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from common.errors import InputError
from common.fsio import atomic_write
from indexes.codes import MAX_BITS, MIN_BITS, n_words

logger = logging.getLogger(__name__)

MAGIC = b"CMHHAMIX"
VERSION = 1
HEADER = struct.Struct("<8sIIQIIQQII4xI")
HEADER_SIZE = 64
ALIGN = 64
assert HEADER.size == HEADER_SIZE


def _aligned(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def save(path: Path, *, n_bits: int, ids: np.ndarray, codes: np.ndarray) -> None:
    """Write ids (n,) int64 and codes (n, words) uint64 to `path` atomically."""
    ids_le = np.ascontiguousarray(ids, dtype="<i8")
    codes_le = np.ascontiguousarray(codes, dtype="<u8")
    n, words = ids_le.shape[0], n_words(n_bits)
    ids_offset = HEADER_SIZE
    codes_offset = _aligned(ids_offset + ids_le.nbytes)
    fields = (
        MAGIC,
        VERSION,
        n_bits,
        n,
        words,
        0,
        ids_offset,
        codes_offset,
        zlib.crc32(ids_le.data),
        zlib.crc32(codes_le.data),
    )
    head = HEADER.pack(*fields, 0)
    head = HEADER.pack(*fields, zlib.crc32(head[:60]))

    def write(f: BinaryIO) -> None:
        f.write(head)
        f.write(ids_le.data)
        f.write(b"\0" * (codes_offset - ids_offset - ids_le.nbytes))
        f.write(codes_le.data)

    atomic_write(path, write)


def load(path: Path, *, mmap: bool) -> tuple[int, np.ndarray, np.ndarray]:
    """Read and check a file written by `save`: returns (n_bits, ids (n,), codes (n, words)).

    With mmap the codes are a read-only memory map of the file (the ids are read into memory).
    Raises InputError naming the first problem found.
    """
    if not path.is_file():
        raise InputError(f"expected an index file at {path}, got nothing there")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if head[: len(MAGIC)] != MAGIC[: len(head)]:
        raise InputError(
            f"expected a Hamming index file starting with {MAGIC!r}, got {head[:8]!r} in {path}"
        )
    if len(head) < HEADER_SIZE:
        raise InputError(
            f"expected a {HEADER_SIZE}-byte header, got a truncated file of {size} bytes: {path}"
        )
    magic, version, n_bits, n, words, _, ids_offset, codes_offset, ids_crc, codes_crc, crc = (
        HEADER.unpack(head)
    )
    if version != VERSION:
        raise InputError(f"expected index format version {VERSION}, got version {version}: {path}")
    if zlib.crc32(head[:60]) != crc:
        raise InputError(f"expected header checksum {crc:#010x}, got a corrupted header: {path}")
    if not MIN_BITS <= n_bits <= MAX_BITS or words != n_words(n_bits):
        raise InputError(f"expected n_bits in 8..1024 and matching words, got {n_bits}, {words}")
    if ids_offset != HEADER_SIZE or codes_offset != _aligned(HEADER_SIZE + 8 * n):
        raise InputError(f"expected the standard section offsets, got {ids_offset}, {codes_offset}")
    expected_size = codes_offset + 8 * n * words
    if size != expected_size:
        what = "truncated" if size < expected_size else "with trailing bytes"
        raise InputError(
            f"expected {expected_size} bytes for {n} codes of {n_bits} bits, got {size} "
            f"({what}): {path}"
        )
    ids = np.fromfile(path, dtype="<i8", count=n, offset=ids_offset).astype(np.int64, copy=False)
    if zlib.crc32(ids.data) != ids_crc:
        raise InputError(f"expected ids checksum {ids_crc:#010x}, got corrupted ids: {path}")
    if mmap and n:
        mapped = np.memmap(path, dtype="<u8", mode="r", offset=codes_offset, shape=(n, words))
        codes = np.asarray(mapped).view(np.uint64)
    else:
        codes = np.fromfile(path, dtype="<u8", count=n * words, offset=codes_offset)
        codes = codes.reshape(n, words).astype(np.uint64, copy=False)
    if zlib.crc32(np.ascontiguousarray(codes).data) != codes_crc:
        raise InputError(f"expected codes checksum {codes_crc:#010x}, got corrupted codes: {path}")
    return int(n_bits), ids, codes
