"""Background compaction: merge small segments, drop deleted rows, without blocking anyone.

The merge policy is Lucene's LogMergePolicy at small scale: a segment's level is
log_MERGE_FACTOR of its size in sealed-growing-part units; MERGE_FACTOR adjacent segments of one
level merge into one of the next, so a store of N rows has O(log N) segments and each row is
rewritten O(log N) times. A segment whose deleted rows pass DEAD_FRACTION is rewritten alone.

A merge reads its segments (immutable) and their masks at the start and writes the merged file
without any lock; searches and writes go on. Only the swap takes the writer lock: one SQLite
transaction replaces the segments' rows in `segments` and drops the tombstones of the rows left
out; rows deleted while the merge ran keep their tombstones and are masked in the new segment.
A crash before that commit leaves an orphan file that the next open removes; after it, old files
that were not yet removed are orphans too.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from indexes.hamming import LiveMask
from store.parts import LoadedSegment
from store.segment import SegmentData
from store.store import SEAL_ROWS, SEGMENTS_DIR, Store

logger = logging.getLogger(__name__)

MERGE_FACTOR = 8
DEAD_FRACTION = 0.2
IDLE_CHECK_S = 30.0  # the compactor also looks for work this often


@dataclass(frozen=True)
class Merge:
    """Segments to merge (adjacent, in seq order) and their masks when the merge was planned."""

    segments: tuple[LoadedSegment, ...]
    masks: tuple[LiveMask | None, ...]


def level(rows: int) -> int:
    """The merge level of a segment of `rows` live rows."""
    return max(0, int(math.log(max(rows, 1) / SEAL_ROWS, MERGE_FACTOR) + 1e-9))


def plan(segments: list[LoadedSegment]) -> list[LoadedSegment] | None:
    """The next segments to merge, or None when the policy is satisfied."""
    for seg in segments:
        if seg.rows and seg.dead / seg.rows > DEAD_FRACTION:
            return [seg]
    levels = [level(s.rows - s.dead) for s in segments]
    for start in range(len(segments) - MERGE_FACTOR + 1):
        window = levels[start : start + MERGE_FACTOR]
        if all(x == window[0] for x in window):
            return segments[start : start + MERGE_FACTOR]
    return None


def compact_once(store: Store, *, force: bool = False) -> bool:
    """Run one merge the policy (or, with force, a full merge) asks for; whether it did one.

    In a store shared by several processes only the one that holds its COMPACT_LOCK merges.
    """
    if not store.compacts:
        return False
    with store._merge_lock:
        return _compact(store, force=force)


def _compact(store: Store, *, force: bool) -> bool:
    with store._writing():
        chosen = list(store._segments) if force else plan(store._segments)
        if not chosen or (force and len(chosen) == 1 and chosen[0].dead == 0):
            return False
        merge = Merge(tuple(chosen), tuple(s.mask for s in chosen))
    start = time.perf_counter()
    data = _merged(merge)
    new = store._write_segment(data) if len(data) else None
    dropped = np.concatenate(
        [
            s.seqs[~m.to_bool()]
            for s, m in zip(merge.segments, merge.masks, strict=True)
            if m is not None
        ]
        or [np.empty(0, np.int64)]
    )
    with store._writing():
        names = [s.name for s in merge.segments]
        conn = store._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("DELETE FROM segments WHERE name = ?", [(n,) for n in names])
            conn.executemany("DELETE FROM tombstones WHERE seq = ?", [(int(s),) for s in dropped])
            if new is not None:
                store._record_segment(new)
            else:
                store.bump_layout()
            conn.execute("COMMIT")
        except BaseException:
            store._roll_back()
            if new is not None:
                (store.root / SEGMENTS_DIR / new.name).unlink(missing_ok=True)
            raise
        if new is not None:
            new.mask = _deleted_meanwhile(merge, new)
        first = next(i for i, s in enumerate(store._segments) if s is merge.segments[0])
        store._segments[first : first + len(names)] = [new] if new is not None else []
        store._publish()
    for name in names:
        (store.root / SEGMENTS_DIR / name).unlink(missing_ok=True)
    logger.info(
        "merged %d segments into %d rows (%d deleted rows dropped) in %.2f s",
        len(names),
        len(data),
        dropped.size,
        time.perf_counter() - start,
    )
    return True


def _merged(merge: Merge) -> SegmentData:
    """The live rows of the merge's segments as they were planned, in seq order."""
    seqs, image, text = [], [], []
    for seg, mask in zip(merge.segments, merge.masks, strict=True):
        keep = slice(None) if mask is None else mask.to_bool()
        seqs.append(np.asarray(seg.seqs)[keep])
        image.append(np.asarray(seg.image.codes)[keep])
        text.append(np.asarray(seg.text.codes)[keep])
    return SegmentData(np.concatenate(seqs), np.concatenate(image), np.concatenate(text))


def _deleted_meanwhile(merge: Merge, new: LoadedSegment) -> LiveMask | None:
    """The new segment's mask: rows deleted after the merge was planned (writer lock held)."""
    gone = []
    for seg, planned in zip(merge.segments, merge.masks, strict=True):
        if seg.mask is not None and seg.mask is not planned:
            alive_then = np.ones(seg.rows, bool) if planned is None else planned.to_bool()
            gone.append(seg.seqs[alive_then & ~seg.mask.to_bool()])
    dead = np.concatenate(gone) if gone else np.empty(0, np.int64)
    if dead.size == 0:
        return None
    return LiveMask.all_live(new.rows).without(np.searchsorted(new.seqs, dead))


class Compactor:
    """A daemon thread that runs compact_once whenever a write wakes it (or every 30 s)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-compactor", daemon=True)
        store.compactor = self
        self._thread.start()

    def wake(self) -> None:
        """Ask for a look at the merge policy."""
        self._wake.set()

    def stop(self) -> None:
        """Finish the merge in progress and stop."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=600)

    def _run(self) -> None:
        try:
            removed = self.store.collect_orphan_images()
            if removed:
                logger.warning("removed %d image files that no item refers to", removed)
        except Exception:  # a bug: logged, and compaction still runs
            logger.exception("image clean-up failed")
        while not self._stop.is_set():
            try:
                if not self.store.compacts:  # shared: take over when the compacting process ends
                    self.store._take_compaction()
                while not self._stop.is_set() and compact_once(self.store):
                    pass
            except Exception:  # a bug or a full disk: logged, retried at the next wake
                logger.exception("compaction failed")
            self._wake.wait(IDLE_CHECK_S)
            self._wake.clear()
