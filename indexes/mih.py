"""Multi-index hashing (Norouzi, Punjani and Fleet, CVPR 2012): exact k-NN that probes, not scans.

Each code is cut into `n_tables` disjoint substrings of about n_bits / n_tables bits, and each
substring indexes its own table (a counting-sorted bucket array). If two codes differ in D bits,
some substring differs in at most D // n_tables bits (pigeonhole). A query probes every table at
substring radius r = 0, 1, 2, ..., verifying each new candidate with its full distance; after table
j (0-based) at radius r, every code within n_tables * r + j of the query has been seen, so the
search stops as soon as its k-th best distance is within that bound. Results (ties included) are
identical to HammingIndex's: candidates are ranked by (distance, insertion order).

It wins when the k-th distance is small against n_bits, as with learned codes whose neighbours are
close; on uniform random codes the radius grows until the probes cost more than a scan, and such a
query is handed to flat search (see work_budget), so the worst case stays near twice flat search.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np

from common.errors import InputError
from indexes.codes import check_packed
from indexes.hamming import HammingIndex, check_k, run_calls, split_range
from indexes.kernels import POS_BITS, heap_replace_top, popcount64
from indexes.results import empty_keys, from_keys

MAX_SUBSTRING_BITS = 24  # a table's bucket array has 2**bits + 1 entries
# One bucket or candidate visit (random memory access) costs about as much as comparing this
# many codes in the vectorised flat scan (measured on the benchmark machine, 64 and 128 bits).
FLAT_COST = 256
MIN_WORK_BUDGET = 4096


def default_tables(n_bits: int, n: int) -> int:
    """Norouzi's choice: substrings of about log2(n) bits, and at most MAX_SUBSTRING_BITS."""
    by_size = round(n_bits / max(math.log2(max(n, 2)), 1.0))
    return min(n_bits, max(1, by_size, math.ceil(n_bits / MAX_SUBSTRING_BITS)))


@dataclass(frozen=True)
class _Tables:
    """The substring tables of one snapshot; never mutated after construction."""

    flat: HammingIndex  # codes and ids (this object is never changed after the build)
    starts: np.ndarray  # (T,) int64 first bit of each substring
    lengths: np.ndarray  # (T,) int64 bits of each substring
    bases: np.ndarray  # (T,) int64 where each table's bucket offsets start in `offsets`
    offsets: np.ndarray  # (sum(2**len + 1),) int32 bucket starts into each table's row of order
    order: np.ndarray  # (T, n) int32 positions, grouped by substring value


def _substrings(codes: np.ndarray, start: int, length: int) -> np.ndarray:
    """(n,) uint64 value of bits [start, start + length) of each (n, words) packed code."""
    word, shift = divmod(start, 64)
    value = codes[:, word] >> np.uint64(shift)
    if shift + length > 64:
        value |= codes[:, word + 1] << np.uint64(64 - shift)
    masked: np.ndarray = value & np.uint64((1 << length) - 1)
    return masked


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _fill_buckets(keys: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
    """Counting-sort placement: out lists positions by key, ascending positions within a key."""
    cursor = offsets[:-1].copy()
    for p in range(keys.shape[0]):
        slot = cursor[keys[p]]
        out[slot] = p
        cursor[keys[p]] = slot + 1


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _substring(code: np.ndarray, start: int, length: int) -> np.uint64:
    """Bits [start, start + length) of one (words,) packed code, as an integer."""
    word, shift = start // 64, start % 64
    value = code[word] >> np.uint64(shift)
    if shift + length > 64:
        value |= code[word + 1] << np.uint64(64 - shift)
    bits: np.uint64 = value & np.uint64((1 << length) - 1)
    return bits


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _probe(
    queries: np.ndarray,
    db: np.ndarray,
    tables: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    heaps: np.ndarray,
    budget: int,
    gave_up: np.ndarray,
) -> None:
    """Fill the (m, k) key heaps of the (m, words) queries by probing the substring tables.

    Probes run radius by radius, table by table; a code is listed by every probe whose table
    substring is within that radius, and counts only at its first one (the smallest
    (substring distance, table) pair), so no per-query "seen" array is needed. A query whose
    probes plus candidates pass `budget` stops and sets gave_up[qi]: flat search is cheaper then.
    """
    starts, lengths, bases, offsets, order = tables
    n_tables = starts.shape[0]
    words = db.shape[1]
    qkeys = np.empty(n_tables, np.int64)
    diff = np.empty(words, np.uint64)
    longest = lengths.max()
    for qi in range(queries.shape[0]):
        q = queries[qi]
        heap = heaps[qi]
        for j in range(n_tables):
            qkeys[j] = np.int64(_substring(q, starts[j], lengths[j]))
        done = False
        work = 0
        for r in range(longest + 1):
            for j in range(n_tables):
                length = lengths[j]
                if r > length:
                    continue
                here = r * n_tables + j  # this probe's rank in the probing order
                mask = (np.int64(1) << r) - 1  # Gosper's hack: every length-bit mask with r ones
                limit = np.int64(1) << length
                while mask < limit and work <= budget:
                    row = bases[j] + (qkeys[j] ^ mask)
                    lo, hi = offsets[row], offsets[row + 1]
                    work += 1 + hi - lo
                    for s in range(lo, hi):
                        p = order[j, s]
                        d = np.uint64(0)
                        for w in range(words):
                            diff[w] = q[w] ^ db[p, w]
                            d += popcount64(diff[w])
                        cand = (np.int64(d) << POS_BITS) | p
                        if cand >= heap[0]:
                            continue  # also true of a code seen before: the heap only tightens
                        first = here
                        for t in range(n_tables):
                            sub = np.int64(popcount64(_substring(diff, starts[t], lengths[t])))
                            first = min(first, sub * n_tables + t)
                        if first == here:
                            heap_replace_top(heap, cand)
                    if mask == 0:
                        break
                    low = mask & -mask
                    ripple = mask + low
                    mask = (((ripple ^ mask) >> 2) // low) | ripple
                if work > budget:
                    gave_up[qi] = True
                    done = True
                    break
                # Everything within n_tables * r + j is found; a table probed to its full
                # length has listed every code.
                if (heap[0] >> POS_BITS) <= n_tables * r + j or r == length:
                    done = True
                    break
            if done:
                break


class MultiIndexHamming:
    """Exact Hamming k-NN by multi-index hashing; same add/remove/search/len as HammingIndex.

    Every add or remove rebuilds the tables (O(n * n_tables)): build in batches, then search.
    """

    def __init__(
        self,
        n_bits: int,
        *,
        n_tables: int | None = None,
        work_budget: int | None = None,
        threads: int | None = None,
    ) -> None:
        """An empty index; n_tables defaults to about n_bits / log2(n), chosen at each build.

        work_budget: buckets plus candidates one query may visit before it is answered by flat
        search instead (default max(MIN_WORK_BUDGET, n // FLAT_COST)): the worst case stays
        near twice a flat search.
        """
        flat = HammingIndex(n_bits, threads=threads)
        if n_tables is not None and not 1 <= n_tables <= n_bits:
            raise InputError(f"expected n_tables in 1..{n_bits}, got {n_tables}")
        self.n_bits = flat.n_bits
        self.fixed_tables = n_tables
        if work_budget is not None and work_budget < 1:
            raise InputError(f"expected work_budget >= 1, got {work_budget}")
        self.work_budget = work_budget
        self._pool = ThreadPoolExecutor(flat.threads - 1) if flat.threads > 1 else None
        self._tables = self._build(flat)

    def __len__(self) -> int:
        """How many codes the index holds."""
        return len(self._tables.flat)

    @property
    def n_tables(self) -> int:
        """How many substring tables the current build uses."""
        return int(self._tables.starts.shape[0])

    @property
    def ids(self) -> np.ndarray:
        """(n,) int64 ids in insertion order (read-only view)."""
        return self._tables.flat.ids

    @property
    def codes(self) -> np.ndarray:
        """(n, n_words) uint64 packed codes in insertion order (read-only view)."""
        return self._tables.flat.codes

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids),) bool: which of the int64 ids are in the index."""
        return self._tables.flat.contains(ids)

    def add(self, codes: np.ndarray, ids: np.ndarray) -> None:
        """Append codes under new ids (all or nothing; as HammingIndex.add) and rebuild."""
        flat = self._tables.flat.copy()
        flat.add(codes, ids)
        self._tables = self._build(flat)

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (absent ones ignored), rebuild, and return how many went."""
        flat = self._tables.flat.copy()
        removed = flat.remove(ids)
        if removed:
            self._tables = self._build(flat)
        return removed

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN of (m, n_words) uint64 queries: the same (dists, ids) as HammingIndex."""
        check_packed(queries, self.n_bits, name="queries")
        check_k(k)
        tables = self._tables
        m, n = queries.shape[0], len(tables.flat)
        heap_k = min(int(k), n)
        keys = empty_keys(m, heap_k, self.n_bits)
        gave_up = np.zeros(m, dtype=bool)
        if m and heap_k:
            packed = (tables.starts, tables.lengths, tables.bases, tables.offsets, tables.order)
            db = np.asarray(tables.flat.codes)
            budget = self.work_budget or max(MIN_WORK_BUDGET, n // FLAT_COST)
            calls: list[tuple[object, ...]] = [
                (_probe, queries[a:b], db, packed, keys[a:b], budget, gave_up[a:b])
                for a, b in split_range(m, tables.flat.threads)
            ]
            run_calls(self._pool, calls)
        # Rows that gave up may still hold empty slots; flat search overwrites them below.
        dists, out_ids = from_keys(keys, tables.flat.ids, int(k))
        redo = np.flatnonzero(gave_up)
        if redo.size:
            dists[redo], out_ids[redo] = tables.flat.search(queries[redo], k)
        return dists, out_ids

    def range_search(self, queries: np.ndarray, radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every code within `radius` of each query, as HammingIndex.range_search gives them.

        Answered by the flat scan the tables sit on: a range search visits every code within
        the radius anyway, and the flat scan's order (distance, then insertion) is the contract.
        """
        return self._tables.flat.range_search(queries, radius)

    def _build(self, flat: HammingIndex) -> _Tables:
        """Cut the codes into substrings and counting-sort each table."""
        n = len(flat)
        if n >= 2**31 - 1:
            raise InputError(f"expected fewer than 2**31 codes for multi-index hashing, got {n}")
        n_tables = self.fixed_tables or default_tables(self.n_bits, n)
        edges = np.linspace(0, self.n_bits, n_tables + 1).round().astype(np.int64)
        starts, lengths = edges[:-1], np.diff(edges)
        if int(lengths.max()) > MAX_SUBSTRING_BITS:
            raise InputError(
                f"expected substrings of at most {MAX_SUBSTRING_BITS} bits, got {lengths.max()} "
                f"({n_tables} tables for {self.n_bits} bits)"
            )
        sizes = (np.int64(1) << lengths) + 1
        bases = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        offsets = np.zeros(int(sizes.sum()), dtype=np.int32)
        order = np.empty((n_tables, n), dtype=np.int32)
        codes = np.asarray(flat.codes)
        for j in range(n_tables):
            keys = _substrings(codes, int(starts[j]), int(lengths[j]))
            counts = np.bincount(keys.astype(np.int64), minlength=int(sizes[j]) - 1)
            row = offsets[bases[j] : bases[j] + sizes[j]]
            row[1:] = np.cumsum(counts)
            _fill_buckets(keys.astype(np.int64), row, order[j])
        return _Tables(flat, starts, lengths, bases, offsets, order)
