"""The writer's in-memory parts: loaded segments with their current masks, and the growing part.

These are what the Store changes under its writer lock; each turns into an immutable view.Part
when a View is published, so a search never sees one change. Kept apart from the Store because
they are plain data with local rules (masks replaced, never changed in place; the growing part's
buffers preallocated, views seeing a prefix) that the Store's locking does not need to know.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexes.hamming import HammingIndex, LiveMask
from store import metadata as md
from store.filters import GROWING
from store.rows import codes_from_bytes
from store.segment import SegmentData
from store.view import Part


@dataclass(eq=False)
class LoadedSegment:
    """A loaded segment and its current live mask (replaced, never changed in place)."""

    name: str
    image: HammingIndex
    text: HammingIndex
    rows: int
    crc: int
    mask: LiveMask | None = None  # None while every row is live

    @classmethod
    def of(cls, name: str, data: SegmentData, crc: int, n_bits: int) -> LoadedSegment:
        """The segment `name` holding data (its file checked against crc)."""
        image = HammingIndex.from_arrays(n_bits, data.image_codes, data.seqs)
        return cls(name, image, image.with_codes(data.text_codes), len(data), crc)

    @property
    def seqs(self) -> np.ndarray:
        return self.image.ids

    @property
    def dead(self) -> int:
        return 0 if self.mask is None else self.rows - self.mask.count

    def part(self) -> Part:
        return Part(self.name, self.image, self.text, self.mask)

    def without(self, seqs: np.ndarray) -> None:
        """Mask these seqs (all in this segment) dead: a new bitset, n / 8 bytes copied."""
        current = self.mask if self.mask is not None else LiveMask.all_live(self.rows)
        self.mask = current.without(np.searchsorted(self.seqs, seqs))


def apply_tombstones(segments: list[LoadedSegment], dead: np.ndarray) -> None:
    """Give each segment the mask of the tombstoned seqs (ascending `dead`) that fall in it.

    Tombstones only grow while a segment lives, so a segment whose dead count already matches
    keeps its mask (and its bitset is not rebuilt).
    """
    for seg in segments:
        lo, hi = np.searchsorted(dead, [seg.seqs[0], seg.seqs[-1] + 1]) if seg.rows else (0, 0)
        if hi > lo:
            pos = np.searchsorted(seg.seqs, dead[lo:hi])
            mine = dead[lo:hi][seg.seqs[np.minimum(pos, seg.rows - 1)] == dead[lo:hi]]
            if mine.size != seg.dead:
                seg.mask = LiveMask.all_live(seg.rows).without(np.searchsorted(seg.seqs, mine))


@dataclass(frozen=True)
class Merge:
    """Segments to merge (adjacent, in seq order) and their masks when the merge was planned."""

    segments: tuple[LoadedSegment, ...]
    masks: tuple[LiveMask | None, ...]


def deleted_meanwhile(merge: Merge, new: LoadedSegment) -> LiveMask | None:
    """The merged segment's mask: the rows deleted after the merge was planned (a mask that is
    no longer the planned object was replaced by a delete since; writer lock held)."""
    gone = []
    for seg, planned in zip(merge.segments, merge.masks, strict=True):
        if seg.mask is not None and seg.mask is not planned:
            alive_then = np.ones(seg.rows, bool) if planned is None else planned.to_bool()
            gone.append(seg.seqs[alive_then & ~seg.mask.to_bool()])
    dead = np.concatenate(gone) if gone else np.empty(0, np.int64)
    if dead.size == 0:
        return None
    return LiveMask.all_live(new.rows).without(np.searchsorted(new.seqs, dead))


@dataclass(eq=False)
class Growing:
    """Rows not yet in a segment: preallocated buffers, of which views see a prefix."""

    words: int
    capacity: int  # rows it can hold: the seal size, more after a crash before a seal
    seqs: np.ndarray = field(init=False)
    image: np.ndarray = field(init=False)
    text: np.ndarray = field(init=False)
    mask: np.ndarray = field(init=False)  # copied on delete, so published prefixes never change
    n: int = 0

    def __post_init__(self) -> None:
        self.seqs = np.empty(self.capacity, np.int64)
        self.image = np.empty((self.capacity, self.words), np.uint64)
        self.text = np.empty((self.capacity, self.words), np.uint64)
        self.mask = np.ones(self.capacity, np.uint8)

    def part(self, n_bits: int) -> Part:
        n = self.n
        seqs = self.seqs[:n]
        image = HammingIndex.from_arrays(n_bits, self.image[:n], seqs)
        text = HammingIndex.from_arrays(n_bits, self.text[:n], seqs)
        live = self.mask[:n]
        return Part(GROWING, image, text, None if live.all() else LiveMask.of(live))

    def live_data(self) -> SegmentData:
        keep = self.mask[: self.n].astype(bool)
        return SegmentData(
            self.seqs[: self.n][keep].copy(),
            self.image[: self.n][keep].copy(),
            self.text[: self.n][keep].copy(),
        )

    def append(self, seqs: np.ndarray, image: np.ndarray, text: np.ndarray, *, up_to: int) -> int:
        """Copy rows in until it holds up_to rows; how many it took (the rest need a seal)."""
        take = min(up_to - self.n, len(seqs))
        self.seqs[self.n : self.n + take] = seqs[:take]
        self.image[self.n : self.n + take] = image[:take]
        self.text[self.n : self.n + take] = text[:take]
        self.n += take
        return take

    def without(self, seqs: np.ndarray) -> None:
        """Mask these seqs (all in this part) dead in a new mask array."""
        mask = self.mask.copy()
        mask[np.searchsorted(self.seqs[: self.n], seqs)] = 0
        self.mask = mask


def reloaded_growing(
    old: Growing, conn: sqlite3.Connection, *, after: int, where: Path, seal_rows: int
) -> Growing:
    """The rows after seq `after` (the last segment's), live ones only, read inside the
    caller's snapshot.

    Rows the old growing part holds keep their codes; only newer rows are read whole and
    checked, so catching up after another process's write reads that write's rows.
    """
    alive = np.fromiter(
        (s for (s,) in conn.execute("SELECT seq FROM items WHERE seq > ? ORDER BY seq", (after,))),
        np.int64,
    )
    old_seqs = old.seqs[: old.n]
    pos = np.minimum(np.searchsorted(old_seqs, alive), max(old.n - 1, 0))
    known = (old_seqs[pos] == alive) if old.n else np.zeros(alive.size, bool)
    fresh: dict[int, tuple[bytes, bytes]] = {}
    if not known.all():
        first_new = int(alive[~known][0])
        sql = f"SELECT {md.ROW_COLUMNS} FROM items WHERE seq >= ? ORDER BY seq"
        for row in conn.execute(sql, (first_new,)):
            md.check_row(row, where)
            fresh[row[0]] = (row[6], row[7])
    n = int(alive.size)
    words = old.words
    new = Growing(words, max(seal_rows, n))
    new.seqs[:n] = alive
    new.image[:n][known] = old.image[pos[known]]
    new.text[:n][known] = old.text[pos[known]]
    unknown = alive[~known].tolist()
    if unknown:
        new.image[:n][~known] = codes_from_bytes(b"".join(fresh[s][0] for s in unknown), words)
        new.text[:n][~known] = codes_from_bytes(b"".join(fresh[s][1] for s in unknown), words)
    new.n = n
    return new
