"""Checksummed files of aligned array sections: the one header layout of the store's segment files
(store/segment.py) and of the earlier design's Hamming index files (store/legacy.py).

Layout, little-endian. A header of `header_size` bytes: magic (8 bytes), format version (u32),
n_bits (u32), n rows (u64), words per code (u32), 4 zero bytes, the offset of each section
(u64 each), the CRC-32 of each section (u32 each), zero padding, and the CRC-32 of every header
byte before it (u32, the header's last 4 bytes). Then the sections, in order, the first right
after the header and each later one aligned to 64 bytes (so codes can be memory-mapped aligned),
zero bytes between them: n int64 per section of ids or seqs, n * words uint64 per section of
codes. A write goes through common.fsio's atomic
write (temp file, fsync, rename, fsync of the folder), so a crash leaves the old file or the new
one, both whole. A read checks everything and names the first problem and the file.
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
from indexes.codes import MAX_BITS, MIN_BITS, n_words

ALIGN = 64
PREFIX = "<8sIIQI4x"  # magic, version, n_bits, n, words, 4 zero bytes


@dataclass(frozen=True)
class Section:
    """One section: its name in messages, and whether it holds codes (n, words) uint64 or one
    int64 per row (n,)."""

    name: str
    codes: bool


@dataclass(frozen=True)
class Layout:
    """A file format of this layout: what it is called in messages, its magic, version, header
    size and sections."""

    kind: str
    magic: bytes
    version: int
    header_size: int
    sections: tuple[Section, ...]

    @property
    def header(self) -> struct.Struct:
        """The header's struct: prefix, offsets, CRCs, zero padding, header CRC."""
        s = len(self.sections)
        used = struct.calcsize(PREFIX + "Q" * s + "I" * s)
        return struct.Struct(f"{PREFIX}{'Q' * s}{'I' * s}{self.header_size - used - 4}xI")

    def offsets(self, n: int, words: int) -> tuple[list[int], int]:
        """Each section's offset for n rows of `words`-word codes, and the file's size."""
        at, out = self.header_size, list[int]()
        for section in self.sections:
            if out:  # the first starts right after the header
                at = (at + ALIGN - 1) // ALIGN * ALIGN
            out.append(at)
            at += 8 * n * (words if section.codes else 1)
        return out, at


@dataclass(frozen=True)
class Header:
    """What a checked header says: n_bits, n rows, words per code, the section offsets and
    CRCs, and the header's own CRC (the file's identity)."""

    n_bits: int
    n: int
    words: int
    offsets: list[int]
    crcs: list[int]
    crc: int


def write(path: Path, layout: Layout, *, n_bits: int, arrays: list[np.ndarray]) -> int:
    """Write one array per section to `path` atomically; returns the header CRC."""
    n, words = int(arrays[0].shape[0]), n_words(n_bits)
    data = [
        np.ascontiguousarray(a, dtype="<u8" if s.codes else "<i8")
        for a, s in zip(arrays, layout.sections, strict=True)
    ]
    offsets, end = layout.offsets(n, words)
    fields = (layout.magic, layout.version, n_bits, n, words, *offsets)
    fields += tuple(zlib.crc32(a.data) for a in data)
    head = layout.header.pack(*fields, 0)
    crc = zlib.crc32(head[:-4])
    head = layout.header.pack(*fields, crc)

    def write_to(f: BinaryIO) -> None:
        f.write(head)
        at = layout.header_size
        for offset, a in zip(offsets, data, strict=True):
            f.write(b"\0" * (offset - at))
            f.write(a.data)
            at = offset + a.nbytes

    atomic_write(path, write_to)
    assert path.stat().st_size == end
    return crc


def read_header(path: Path, layout: Layout) -> Header:
    """Check the file's header and size against the layout; InputError naming what is wrong."""
    kind, magic = layout.kind, layout.magic
    if not path.is_file():
        raise InputError(f"expected a {kind} at {path}, it is missing")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(layout.header_size)
    if head[: len(magic)] != magic[: len(head)]:
        raise InputError(f"expected a {kind} starting with {magic!r}, got {head[:8]!r}: {path}")
    if len(head) < layout.header_size:
        raise InputError(
            f"expected a {kind} starting with {magic!r} and a {layout.header_size}-byte header, "
            f"got a truncated file of {size} bytes: {path}"
        )
    _, version, n_bits, n, words, *rest = layout.header.unpack(head)
    s = len(layout.sections)
    offsets, crcs, crc = rest[:s], rest[s : 2 * s], rest[2 * s]
    if version != layout.version:
        raise InputError(f"expected {kind} version {layout.version}, got version {version}: {path}")
    if zlib.crc32(head[:-4]) != crc:
        raise InputError(
            f"expected a header with a valid checksum ({crc:#010x}), got a corrupted header: {path}"
        )
    if not MIN_BITS <= n_bits <= MAX_BITS or words != n_words(n_bits):
        raise InputError(
            f"expected n_bits in {MIN_BITS}..{MAX_BITS} and its words, got {n_bits}, {words}: "
            f"{path}"
        )
    want, end = layout.offsets(n, words)
    if offsets != want:
        raise InputError(f"expected the section offsets {want}, got {offsets}: {path}")
    if size != end:
        what = "truncated" if size < end else "with trailing bytes"
        raise InputError(
            f"expected {end} bytes for {n} rows of {n_bits} bits, got {size} ({what}): {path}"
        )
    return Header(n_bits, n, words, offsets, crcs, crc)


def read_sections(path: Path, layout: Layout, header: Header, *, mmap: bool) -> list[np.ndarray]:
    """The sections of a file whose header was checked, each checked against its CRC: int64
    (n,) or uint64 (n, words) arrays, read-only memory maps of the file if mmap."""
    n, words = header.n, header.words
    out: list[np.ndarray] = []
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if mmap and n else None
    for section, offset, want in zip(layout.sections, header.offsets, header.crcs, strict=True):
        count = n * (words if section.codes else 1)
        dtype = "<u8" if section.codes else "<i8"
        if mapped is not None:
            raw = mapped[offset : offset + 8 * count].view(dtype)
        else:
            raw = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        if zlib.crc32(np.ascontiguousarray(raw).data) != want:
            raise InputError(
                f"expected {section.name} section checksum {want:#010x}, got corrupted "
                f"{section.name}: {path}"
            )
        array = np.asarray(raw).view(np.uint64 if section.codes else np.int64)
        out.append(array.reshape(n, words) if section.codes else array)
    return out
