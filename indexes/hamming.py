"""HammingIndex: exact top-k and radius search over packed uint64 codes, with int64 external ids.

Search is a tiled, multi-threaded scan (numba kernels in indexes/kernels.py): no (m, n) distance
matrix is ever built, so memory stays O(m * k) for any batch and any database size. Results follow
FAISS: (dists int32 (m, k), ids int64 (m, k)), padded with id -1 and distance int32 max when k
exceeds the index size. Ties are broken by insertion order (earlier first), so results are
reproducible.

A search may take a `LiveMask`: only codes whose mask byte is 1 can be returned (deleted rows of
a store segment, or rows a filter keeps out), with the same order and padding rules.

Thread safety: search, range_search and contains only read one immutable snapshot of the
index, so any number of threads may call them at once. add and remove build a new snapshot and
swap it in with one assignment: a concurrent search sees either the old or the new contents.
Writers must not race each other (one thread adds and removes, or build a copy() and swap it).

Over 400 lines because the index, its live masks and the scheduling of its scan pieces over
threads (shared by search_parts and MIH) are one search path; each part is a small function.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from common.errors import InputError
from indexes.asymmetric import WD_SENTINEL, Asymmetric
from indexes.codes import check_packed, n_words
from indexes.kernels import MAX_CODES, kernels_for
from indexes.results import PAD_DIST, PAD_ID, empty_keys, from_keys

logger = logging.getLogger(__name__)

# Below this many uint64 words of codes (16 MiB) a single query is scanned by one thread: waking
# a second costs more than it saves. On this project's 2-core machine (32 MiB L3), 1M 64-bit
# codes (8 MiB) took 162 us on one thread and 262 us split over two; 1M 128-bit codes 696 vs
# 509 us, 4M 64-bit 993 vs 777 us (medians of 7).
SPLIT_MIN_WORDS = 1 << 21
CHUNKS_PER_THREAD = 4  # pieces of work per search thread (see HammingIndex._scan)
MIN_QUERY_CHUNK = 64  # queries that share one pass over the database (kernels.QUERY_BLOCK)
MIN_DB_CHUNK = 1 << 20  # codes per piece when one query is split over the database


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool_for(threads: int) -> ThreadPoolExecutor | None:
    """One shared pool of threads - 1 workers per thread count, so indexes are cheap to make."""
    if threads <= 1:
        return None
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="hamming")
        return pool


@dataclass(frozen=True)
class LiveMask:
    """Which codes a search may return: a bitset (bit i % 64 of word i // 64 set = code i live).

    Bits, as Lucene's live docs, so that a copy for one more delete costs n / 8 bytes.
    """

    words: np.ndarray  # (ceil(n / 64),) uint64
    n: int  # how many codes it covers
    count: int  # how many of them are live

    @classmethod
    def of(cls, live: np.ndarray) -> LiveMask:
        """The mask of a (n,) bool (or 0/1) array."""
        n = int(live.shape[0])
        packed = np.packbits(np.asarray(live, dtype=bool), bitorder="little")
        padded = np.zeros(-(-n // 64) * 8, np.uint8)
        padded[: packed.size] = packed
        words = padded.view("<u8").astype(np.uint64, copy=False)
        return cls(words, n, int(np.count_nonzero(live)))

    @classmethod
    def all_live(cls, n: int) -> LiveMask:
        """Every one of n codes live."""
        return cls.of(np.ones(n, dtype=bool))

    def without(self, positions: np.ndarray) -> LiveMask:
        """A new mask with the codes at these positions dead (this one is unchanged)."""
        pos = np.unique(np.asarray(positions, dtype=np.int64))
        words = self.words.copy()
        shifts = (pos & 63).astype(np.uint64)
        was_live = (words[pos >> 6] >> shifts) & np.uint64(1)
        np.bitwise_and.at(words, pos >> 6, ~(np.uint64(1) << shifts))
        return LiveMask(words, self.n, self.count - int(was_live.sum()))

    def to_bool(self) -> np.ndarray:
        """(n,) bool: which codes are live."""
        as_bytes = self.words.astype("<u8", copy=False).view(np.uint8)
        return np.unpackbits(as_bytes, bitorder="little")[: self.n].astype(bool)


_ALL_LIVE = np.empty(0, np.uint64)


@dataclass(frozen=True)
class _Snapshot:
    """Everything a search reads; never mutated after construction."""

    codes: np.ndarray  # (n, words) uint64, C-contiguous (maybe a read-only memory map)
    ids: np.ndarray  # (n,) int64 in insertion order
    sorted_ids: np.ndarray  # (n,) int64 ascending
    sorted_pos: np.ndarray  # (n,) int64: ids[sorted_pos[i]] == sorted_ids[i]


def check_ids(ids: np.ndarray, *, n: int | None = None) -> None:
    """Raise InputError unless ids is a 1-D int64 array (of length n when given) of ids >= 0."""
    if not isinstance(ids, np.ndarray) or ids.dtype != np.int64:
        got = ids.dtype if isinstance(ids, np.ndarray) else type(ids).__name__
        raise InputError(f"expected ids as an int64 numpy array, got {got}")
    if ids.ndim != 1 or (n is not None and ids.shape[0] != n):
        want = f"({n},)" if n is not None else "(n,)"
        raise InputError(f"expected ids of shape {want}, got shape {ids.shape}")
    if ids.size and int(ids.min()) < 0:
        raise InputError(f"expected ids >= 0 (-1 marks padding), got {int(ids.min())}")


def check_k(k: int) -> None:
    """Raise InputError unless k is an int >= 1."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InputError(f"expected k as an int >= 1, got {k!r}")


def split_range(total: int, parts: int) -> list[tuple[int, int]]:
    """Split range(total) into at most `parts` contiguous non-empty (start, stop) chunks."""
    parts = max(1, min(parts, total))
    bounds = np.linspace(0, total, parts + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


class HammingIndex:
    """Exact Hamming index over n_bits-bit codes packed as (n, n_words(n_bits)) uint64."""

    def __init__(self, n_bits: int, *, threads: int | None = None) -> None:
        """An empty index; `threads` (default: all CPUs) is how many threads one search uses."""
        self.n_words = n_words(n_bits)
        self.n_bits = int(n_bits)
        if threads is not None and (isinstance(threads, bool) or threads < 1):
            raise InputError(f"expected threads >= 1, got {threads!r}")
        self.threads = threads if threads is not None else (os.cpu_count() or 1)
        self._pool = _pool_for(self.threads)  # worker threads start on first use
        empty_ids = np.empty(0, np.int64)
        self._snap = _Snapshot(
            np.empty((0, self.n_words), np.uint64), empty_ids, empty_ids, empty_ids
        )
        self._kernels = kernels_for(self.n_words)

    def __len__(self) -> int:
        """How many codes the index holds."""
        return int(self._snap.ids.shape[0])

    def __repr__(self) -> str:
        return f"HammingIndex(n_bits={self.n_bits}, size={len(self)})"

    @property
    def ids(self) -> np.ndarray:
        """(n,) int64 ids in insertion order (read-only view)."""
        return _read_only(self._snap.ids)

    @property
    def codes(self) -> np.ndarray:
        """(n, n_words) uint64 packed codes in insertion order (read-only view)."""
        return _read_only(self._snap.codes)

    def copy(self) -> HammingIndex:
        """A new index with the same contents (shared until either changes); cheap."""
        twin = HammingIndex(self.n_bits, threads=self.threads)
        twin._snap = self._snap
        return twin

    @classmethod
    def from_arrays(
        cls, n_bits: int, codes: np.ndarray, ids: np.ndarray, *, threads: int | None = None
    ) -> HammingIndex:
        """An index over existing (n, n_words) codes (not copied; a memory map may do) and ids."""
        index = cls(n_bits, threads=threads)
        check_packed(codes, index.n_bits, name="codes")
        check_ids(ids, n=codes.shape[0])
        if ids.size < 2 or bool(np.all(ids[1:] > ids[:-1])):  # ascending already: no sort
            sorted_ids, order = ids, np.arange(ids.size, dtype=np.int64)
        else:
            order = np.argsort(ids, kind="stable")
            sorted_ids = ids[order]
            repeats = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
            if repeats.size:
                raise InputError(f"expected unique ids, got id {int(sorted_ids[repeats[0]])} twice")
        index._snap = _Snapshot(codes=codes, ids=ids, sorted_ids=sorted_ids, sorted_pos=order)
        return index

    def with_codes(self, codes: np.ndarray) -> HammingIndex:
        """An index over other codes under the same ids, sharing the id arrays (no copy)."""
        check_packed(codes, self.n_bits, name="codes")
        snap = self._snap
        if codes.shape[0] != snap.ids.shape[0]:
            raise InputError(f"expected {snap.ids.shape[0]} codes, got {codes.shape[0]}")
        twin = HammingIndex(self.n_bits, threads=self.threads)
        twin._snap = _Snapshot(codes, snap.ids, snap.sorted_ids, snap.sorted_pos)
        return twin

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids),) bool: which of the int64 ids are in the index."""
        check_ids(ids)
        return _positions(self._snap, ids) >= 0

    def add(self, codes: np.ndarray, ids: np.ndarray) -> None:
        """Append (n, n_words) uint64 codes under int64 ids; all or nothing.

        Raises InputError for a wrong dtype or shape, or an id that repeats or is already in
        the index; the index is then unchanged.
        """
        check_packed(codes, self.n_bits, name="codes")
        check_ids(ids, n=codes.shape[0])
        snap = self._snap
        if ids.size == 0:
            return
        order = np.argsort(ids)  # (b,) the new ids sorted
        new_sorted = ids[order]
        repeats = np.flatnonzero(new_sorted[1:] == new_sorted[:-1])
        if repeats.size:
            raise InputError(
                f"expected unique ids, got id {int(new_sorted[repeats[0]])} more than once"
            )
        present = _positions(snap, new_sorted) >= 0
        if present.any():
            raise InputError(
                f"expected new ids, got id {int(new_sorted[np.argmax(present)])} "
                "already in the index"
            )
        n_old = snap.ids.shape[0]
        if n_old + ids.shape[0] > MAX_CODES:
            raise InputError(f"expected at most {MAX_CODES} codes in all, got {n_old + ids.size}")
        slots = np.searchsorted(snap.sorted_ids, new_sorted)
        self._snap = _Snapshot(
            codes=np.ascontiguousarray(np.concatenate([snap.codes, codes])),
            ids=np.concatenate([snap.ids, ids]),
            sorted_ids=np.insert(snap.sorted_ids, slots, new_sorted),
            sorted_pos=np.insert(snap.sorted_pos, slots, n_old + order),
        )

    def remove(self, ids: np.ndarray) -> int:
        """Remove the codes of these int64 ids (absent ids are ignored); returns how many went."""
        check_ids(ids)
        snap = self._snap
        wanted = np.unique(ids)
        pos = _positions(snap, wanted)
        gone = np.sort(pos[pos >= 0])  # (r,) positions to drop, ascending
        if gone.size == 0:
            return 0
        keep = np.ones(snap.ids.shape[0], dtype=bool)
        keep[gone] = False
        keep_sorted = keep[snap.sorted_pos]
        old_pos = snap.sorted_pos[keep_sorted]
        self._snap = _Snapshot(
            codes=np.ascontiguousarray(snap.codes[keep]),
            ids=snap.ids[keep],
            sorted_ids=snap.sorted_ids[keep_sorted],
            # Later codes move down by the number of removed codes before them.
            sorted_pos=old_pos - np.searchsorted(gone, old_pos),
        )
        return int(gone.size)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        live: LiveMask | None = None,
        asymmetric: Asymmetric | None = None,
        radius: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest codes of each (m, n_words) uint64 query (among `live` codes only).

        Returns (dists, ids), both (m, k): int32 Hamming distances ascending and int64 ids,
        ties in insertion order, padded with int32 max and -1 past the (live) index size.
        With `asymmetric` (whose signs are `queries`), ranked by its weighted distances instead
        (indexes/asymmetric.py), which dists then holds. With `radius`, only codes within that
        Hamming distance of the query are found (padding past them).
        Raises InputError for a wrong dtype or shape, k < 1 or a mask of the wrong length.
        """
        plan = self._plan(queries, k, live, asymmetric=asymmetric, radius=radius)
        _drain_all(self._pool, self.threads, plan.jobs)
        return plan.finish()

    def _plan(
        self,
        queries: np.ndarray,
        k: int,
        live: LiveMask | None,
        *,
        asymmetric: Asymmetric | None = None,
        radius: int | None = None,
    ) -> _Plan:
        """The scan jobs of one search and how to turn their heaps into (dists, ids).

        The work is cut into CHUNKS_PER_THREAD pieces per thread that the threads take from a
        shared queue: on a shared machine a descheduled thread then holds back only its piece.
        Few queries are split over the database, many over the queries.
        """
        check_packed(queries, self.n_bits, name="queries")
        check_k(k)
        if radius is not None and (isinstance(radius, bool) or radius < 0):
            raise InputError(f"expected a radius >= 0, got {radius!r}")
        if asymmetric is not None and asymmetric.signs.shape != queries.shape:
            raise InputError(
                f"expected asymmetric queries for {queries.shape[0]} codes of {self.n_bits} "
                f"bits, got {asymmetric.signs.shape[0]} of {asymmetric.n_bits}"
            )
        snap = self._snap
        m, n = queries.shape[0], snap.ids.shape[0]
        if live is not None and live.n != n:
            raise InputError(f"expected a live mask of {n} codes, got one of {live.n}")
        heap_k = min(int(k), n if live is None else live.count)
        if asymmetric is None:
            keys = empty_keys(m, heap_k, self.n_bits)  # (m, heap_k) max-heaps
            scan, extra = self._kernels.knn_scan, None
        else:
            keys = empty_keys(m, heap_k, WD_SENTINEL - 1)
            radii = np.full(m, self.n_bits if radius is None else radius, dtype=np.int64)
            scan = self._kernels.asym_scan
            extra = (*asymmetric.kernel_args(), radii)
        flat = np.ascontiguousarray(queries).reshape(-1)
        mask = _ALL_LIVE if live is None else live.words
        db, w = snap.codes.reshape(-1), self.n_words
        pieces = self.threads * CHUNKS_PER_THREAD
        jobs: list[_Job] = []
        split_db = m < self.threads and n * w >= SPLIT_MIN_WORDS and self._pool is not None
        if m and heap_k and not split_db:
            chunks = split_range(m, max(self.threads, min(pieces, m // MIN_QUERY_CHUNK)))
            jobs = [
                (scan, flat[a * w : b * w], db, 0, n, keys[a:b], mask, _rows(extra, a, b))
                for a, b in chunks
            ]
        elif m and heap_k:
            # Each piece starts with an empty top-k, so pieces stay large: a fresh top-k fills
            # with about k * ln(piece / k) insertions.
            parts = max(self.threads, min(pieces, n // MIN_DB_CHUNK))
            jobs = [
                (scan, flat, db, a, b, keys.copy(), mask, _rows(extra, 0, m))
                for a, b in split_range(n, parts)
            ]

        def finish() -> tuple[np.ndarray, np.ndarray]:
            found = keys
            if split_db and jobs:  # keys carry global positions: the k smallest of all parts
                merged = np.concatenate([job[5] for job in jobs], axis=1)
                found = np.sort(merged, axis=1)[:, :heap_k]
            dists, ids = from_keys(found, snap.ids, int(k))
            if asymmetric is not None:
                outside = dists >= WD_SENTINEL  # slots the radius left empty
            elif radius is not None:
                outside = dists > radius
            else:
                return dists, ids
            dists[outside], ids[outside] = PAD_DIST, PAD_ID
            return dists, ids

        return _Plan(jobs, finish)

    def range_search(self, queries: np.ndarray, radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every code within Hamming distance `radius` of each (m, n_words) uint64 query.

        Returns m pairs (dists int32 (r_i,), ids int64 (r_i,)), by distance then insertion order.
        """
        check_packed(queries, self.n_bits, name="queries")
        if isinstance(radius, bool) or not isinstance(radius, int | np.integer) or radius < 0:
            raise InputError(f"expected radius as an int >= 0, got {radius!r}")
        snap = self._snap
        radius = min(int(radius), self.n_bits)
        flat = np.ascontiguousarray(queries).reshape(-1)
        db = snap.codes.reshape(-1)
        m, w = queries.shape[0], self.n_words
        counts = np.zeros(m, dtype=np.int64)
        chunks = split_range(m, self.threads)
        run_calls(
            self._pool,
            [
                (self._kernels.range_count, flat[a * w : b * w], db, radius, counts[a:b])
                for a, b in chunks
            ],
        )
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        pos = np.empty(int(offsets[-1]), dtype=np.int64)
        dist = np.empty(int(offsets[-1]), dtype=np.int32)
        run_calls(
            self._pool,
            [
                (
                    self._kernels.range_fill,
                    flat[a * w : b * w],
                    db,
                    radius,
                    offsets[a : b + 1] - offsets[a],
                    pos[offsets[a] : offsets[b]],
                    dist[offsets[a] : offsets[b]],
                )
                for a, b in chunks
            ],
        )
        ids = snap.ids[pos]
        return [
            (dist[offsets[i] : offsets[i + 1]], ids[offsets[i] : offsets[i + 1]]) for i in range(m)
        ]


# One piece of a scan: (kernel, queries, db, start, stop, heaps, live words, the asymmetric
# kernel's (tables, lower, radii) of those queries or None).
_Job = tuple[
    Callable[..., None],
    np.ndarray,
    np.ndarray,
    int,
    int,
    np.ndarray,
    np.ndarray,
    tuple[np.ndarray, ...] | None,
]


def _rows(extra: tuple[np.ndarray, ...] | None, a: int, b: int) -> tuple[np.ndarray, ...] | None:
    """The rows a..b-1 of each per-query array of a job's extra arguments."""
    return None if extra is None else tuple(arr[a:b] for arr in extra)


@dataclass(frozen=True)
class _Plan:
    """A search's scan pieces, and the step that turns their heaps into its answer."""

    jobs: list[_Job]
    finish: Callable[[], tuple[np.ndarray, np.ndarray]]


class _InFlight:
    """How many searches of this process are scanning right now.

    A search that starts while another is scanning runs on its own thread alone: the cores are
    already busy with other requests, and handing pieces to a pool thread would only add a wait
    for that thread (about 1.2 ms per single query under load in `cmh bench service`) without
    adding a core. A lone search still spreads over every thread, for its latency.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def enter(self) -> bool:
        """Count one more search; whether it is alone."""
        with self._lock:
            self._count += 1
            return self._count == 1

    def leave(self) -> None:
        with self._lock:
            self._count -= 1


_IN_FLIGHT = _InFlight()


def _drain_all(pool: ThreadPoolExecutor | None, threads: int, jobs: list[_Job]) -> None:
    """Run every job with up to `threads` threads (this one included) taking from one queue;
    with this thread alone while another search is scanning (see _InFlight)."""
    todo: queue.SimpleQueue[_Job] = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)

    def drain() -> None:
        while True:
            try:
                scan, part_queries, db, start, stop, part_keys, live, extra = todo.get_nowait()
            except queue.Empty:
                return
            scan(part_queries, db, start, stop, part_keys, live, *(extra or ()))

    alone = _IN_FLIGHT.enter()
    try:
        run_calls(pool, [(drain,)] * (min(threads, len(jobs)) if alone else 1))
    finally:
        _IN_FLIGHT.leave()


def search_parts(
    parts: Sequence[tuple[HammingIndex, LiveMask | None]],
    queries: np.ndarray,
    k: int,
    *,
    one_thread: bool = False,
    asymmetric: Asymmetric | None = None,
    radius: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over several indexes at once, ties by id: (dists (m, k), ids (m, k)).

    The scan pieces of every part go to the threads in one round (not one round per part), so
    many small parts cost about what one index of their total size costs. With ids that grow
    with insertion across the parts (a store's seqs), ties come out in insertion order.
    `one_thread`: this thread scans every piece itself and never waits for the pool (the same
    answer), for a caller that must not wait on another thread. `asymmetric` and `radius`: as
    HammingIndex.search.
    """
    if not parts:
        raise InputError("expected at least one index to search")
    plans = [
        index._plan(queries, k, live, asymmetric=asymmetric, radius=radius) for index, live in parts
    ]
    first = parts[0][0]
    threads = 1 if one_thread else first.threads
    _drain_all(first._pool, threads, [job for plan in plans for job in plan.jobs])
    answers = [plan.finish() for plan in plans]
    if len(answers) == 1:
        return answers[0]
    dists = np.concatenate([a[0] for a in answers], axis=1)
    ids = np.concatenate([a[1] for a in answers], axis=1)
    # Padding (distance int32 max) sorts after every real hit whatever its id.
    order = np.lexsort((ids, dists), axis=-1)[:, :k]
    return np.take_along_axis(dists, order, 1), np.take_along_axis(ids, order, 1)


def run_calls(pool: ThreadPoolExecutor | None, calls: list[tuple[object, ...]]) -> None:
    """Run fn(*args) for each (fn, *args): the first in this thread, the rest in the pool."""
    futures = []
    for fn, *args in calls[1:]:
        assert callable(fn)
        if pool is None:
            fn(*args)
        else:
            futures.append(pool.submit(fn, *args))
    if calls:
        fn, *args = calls[0]
        assert callable(fn)
        fn(*args)
    for future in futures:
        future.result()


def _positions(snap: _Snapshot, ids: np.ndarray) -> np.ndarray:
    """(len(ids),) int64 position of each id in insertion order, -1 where absent."""
    out = np.full(ids.shape[0], -1, dtype=np.int64)
    size = snap.sorted_ids.shape[0]
    if size == 0:
        return out
    slots = np.minimum(np.searchsorted(snap.sorted_ids, ids), size - 1)
    found = snap.sorted_ids[slots] == ids
    out[found] = snap.sorted_pos[slots[found]]
    return out


def _read_only(arr: np.ndarray) -> np.ndarray:
    view = arr.view()
    view.flags.writeable = False
    return view
