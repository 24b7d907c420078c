"""Segment files: one immutable, checksummed file per segment holding both modalities' codes.

Layout (store/sections.py's, little-endian), version 1: a 96-byte header (magic "CMHSEG01",
version, n_bits, n rows, words per code, the offsets and CRC-32s of the three sections, the
header's CRC-32), then the sections: seqs (n int64, strictly ascending: the rows' insertion
sequence numbers), image codes and text codes (n * words uint64 each, 64-byte aligned).

The modality of each section is fixed by its place in the header, so codes of one modality can
never be served as the other's; the store's SQLite commit point records each segment's size and
header CRC, so a file swapped for another segment's is refused. Written atomically and durably.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import InputError
from indexes.codes import check_packed
from store import sections
from store.sections import Layout, Section

LAYOUT = Layout(
    kind="segment file",
    magic=b"CMHSEG01",
    version=1,
    header_size=96,
    sections=(
        Section("seqs", codes=False),
        Section("image", codes=True),
        Section("text", codes=True),
    ),
)


@dataclass(frozen=True)
class SegmentData:
    """A segment's rows: seqs (n,) int64 ascending, image and text codes (n, words) uint64."""

    seqs: np.ndarray
    image_codes: np.ndarray
    text_codes: np.ndarray

    def __len__(self) -> int:
        return int(self.seqs.shape[0])


def write_segment(path: Path, *, n_bits: int, data: SegmentData) -> int:
    """Write `data` to `path` atomically and durably; returns the header CRC (its identity)."""
    n = len(data)
    check_packed(data.image_codes, n_bits, name="image codes")
    check_packed(data.text_codes, n_bits, name="text codes")
    if data.image_codes.shape[0] != n or data.text_codes.shape[0] != n:
        raise InputError(f"expected {n} codes per modality, got a mismatch")
    if n > 1 and not bool(np.all(data.seqs[1:] > data.seqs[:-1])):
        raise InputError("expected strictly ascending seqs in a segment")
    arrays = [data.seqs, data.image_codes, data.text_codes]
    return sections.write(path, LAYOUT, n_bits=n_bits, arrays=arrays)


def read_segment(path: Path, *, n_bits: int, expect_rows: int, expect_crc: int) -> SegmentData:
    """Memory-map and check a segment file; InputError naming the file and what is wrong."""
    header = sections.read_header(path, LAYOUT)
    if header.crc != expect_crc or header.n != expect_rows:
        raise InputError(
            f"expected the segment recorded in the store ({expect_rows} rows, header crc "
            f"{expect_crc:#010x}), got {header.n} rows, crc {header.crc:#010x}: {path} was "
            "replaced"
        )
    if header.n_bits != n_bits:
        raise InputError(f"expected {n_bits}-bit codes, got {header.n_bits} bits: {path}")
    seqs, image, text = sections.read_sections(path, LAYOUT, header, mmap=True)
    return SegmentData(seqs, image, text)
