"""Background compaction: merge small segments, drop deleted rows, without blocking anyone.

The merge policy is Lucene's LogMergePolicy at small scale (its knobs are the store's
StoreConfig): a segment's level is log_merge_factor of its size in sealed-growing-part units
(seal_rows); merge_factor adjacent segments of one level merge into one of the next, so a store
of N rows has O(log N) segments and each row is rewritten O(log N) times. A segment whose
deleted rows pass dead_fraction is rewritten alone.

A merge reads its segments (immutable) and their masks at the start and writes the merged file
without any lock; searches and writes go on. Only the swap (Store.record_merge: the store's
state changes in the store's methods alone) takes the writer lock: one SQLite
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
from functools import partial

import numpy as np

from store.config import StoreConfig
from store.parts import LoadedSegment, Merge
from store.segment import SegmentData
from store.store import Store

logger = logging.getLogger(__name__)

IDLE_CHECK_S = 30.0  # the compactor also looks for work this often


def level(rows: int, config: StoreConfig) -> int:
    """The merge level of a segment of `rows` live rows."""
    return max(0, int(math.log(max(rows, 1) / config.seal_rows, config.merge_factor) + 1e-9))


def plan(segments: list[LoadedSegment], config: StoreConfig) -> list[LoadedSegment] | None:
    """The next segments to merge, or None when the policy is satisfied."""
    for seg in segments:
        if seg.rows and seg.dead / seg.rows > config.dead_fraction:
            return [seg]
    levels = [level(s.rows - s.dead, config) for s in segments]
    factor = config.merge_factor
    for start in range(len(segments) - factor + 1):
        window = levels[start : start + factor]
        if all(x == window[0] for x in window):
            return segments[start : start + factor]
    return None


def compact_once(store: Store, *, force: bool = False) -> bool:
    """Run one merge the policy (or, with force, a full merge) asks for; whether it did one.

    In a store shared by several processes only the one that holds its COMPACT_LOCK merges.
    """
    if not store.compacts:
        return False
    with store.merge_lock:
        return _compact(store, force=force)


def _chosen(
    segments: list[LoadedSegment], *, force: bool, config: StoreConfig
) -> list[LoadedSegment] | None:
    """What plan picks, or with force every segment (unless one without deleted rows)."""
    if not force:
        return plan(segments, config)
    return None if not segments or (len(segments) == 1 and segments[0].dead == 0) else segments


def _compact(store: Store, *, force: bool) -> bool:
    merge = store.plan_merge(partial(_chosen, force=force, config=store.config))
    if merge is None:
        return False
    start = time.perf_counter()
    data = _merged(merge)
    new = store.write_segment(data) if len(data) else None
    dropped = np.concatenate(
        [
            s.seqs[~m.to_bool()]
            for s, m in zip(merge.segments, merge.masks, strict=True)
            if m is not None
        ]
        or [np.empty(0, np.int64)]
    )
    store.record_merge(merge, new, dropped)
    logger.info(
        "merged %d segments into %d rows (%d deleted rows dropped) in %.2f s",
        len(merge.segments),
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
                    self.store.take_compaction()
                while not self._stop.is_set() and compact_once(self.store):
                    pass
            except Exception:  # a bug or a full disk: logged, retried at the next wake
                logger.exception("compaction failed")
            self._wake.wait(IDLE_CHECK_S)
            self._wake.clear()
