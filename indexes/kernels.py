"""Numba kernels for exact Hamming search over packed uint64 codes.

Every kernel takes codes as flat 1-D uint64 arrays (n * n_words,), because LLVM vectorises the
flat indexing (AVX-512 VPOPCNTQ where the CPU has it) and not the 2-D one. The number of words is
a compile-time constant: `kernels_for(n_words)` compiles (once, cached on disk) one set per length.

A candidate is one int64 key `(distance << POS_BITS) | position`, so that comparing keys orders
by distance, then by insertion order: the tie rule of the index. The top-k of a query is a
max-heap of k keys, filled at the start with sentinel keys (distance n_bits + 1, position
POS_MASK) that every real code beats.

A scan may take a live mask (a bitset of uint64 words, bit i % 64 of word i // 64 clear = code
i deleted or filtered out; an empty array means all live): the cheap first pass over a block
still counts every code, which only makes its lower bound conservative, and the exact second
pass skips codes that are not live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

POS_BITS = 40  # positions below 2**40 (10**12 codes); distances take the bits above
POS_MASK = (1 << POS_BITS) - 1
MAX_CODES = 1 << POS_BITS
SUB = 256  # codes per vectorised distance+min pass; a block is rescanned only if it can win
TILE_BYTES = 64 * 1024  # database tile that a block of queries reuses from L2
QUERY_BLOCK = 64  # queries that share one pass over the database
PLANES = 3  # bits of the coarse weights of an asymmetric scan's first pass


def _ctpop_typer(typingctx: Any, x: Any) -> Any:  # noqa: ARG001 (numba passes the context)
    """Typing and codegen of LLVM ctpop on a uint64 (VPOPCNTQ once vectorised)."""
    sig = types.uint64(types.uint64)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:  # noqa: ARG001
        fn = builder.module.declare_intrinsic("llvm.ctpop", [args[0].type])
        return builder.call(fn, args)

    return sig, codegen


popcount64: Any = intrinsic(_ctpop_typer)  # popcount of one uint64, inside numba code only


@numba.njit(nogil=True, cache=True, boundscheck=False)
def heap_replace_top(heap: np.ndarray, key: np.int64) -> None:
    """Replace the largest key of a full max-heap by a smaller `key` and restore the heap."""
    k = heap.shape[0]
    i = 0
    while True:
        child = 2 * i + 1
        if child >= k:
            break
        right = child + 1
        if right < k and heap[right] > heap[child]:
            child = right
        if heap[child] <= key:
            break
        heap[i] = heap[child]
        i = child
    heap[i] = key


@dataclass(frozen=True)
class Kernels:
    """The compiled kernels for one code length (n_words uint64 words per code)."""

    knn_scan: Callable[..., None]
    asym_scan: Callable[..., None]
    range_count: Callable[..., None]
    range_fill: Callable[..., None]


def _build(words: int) -> Kernels:
    """Compile the kernel set with `words` as a constant (numba keys its disk cache on it)."""
    w_count = words  # closure constant: LLVM unrolls the word loops

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=True)
    def knn_scan(
        queries: np.ndarray,
        db: np.ndarray,
        start: int,
        stop: int,
        heaps: np.ndarray,
        live: np.ndarray,
    ) -> None:
        """Push live db positions [start, stop) into the (m, k) key heaps of the queries."""
        m = heaps.shape[0]
        masked = live.shape[0] > 0
        tile = max(SUB, (TILE_BYTES // (8 * w_count)) // SUB * SUB)
        qvec = np.empty(w_count, np.uint64)
        for qb in range(0, m, QUERY_BLOCK):
            qe = min(qb + QUERY_BLOCK, m)
            for t0 in range(start, stop, tile):
                t1 = min(t0 + tile, stop)
                for qi in range(qb, qe):
                    for w in range(w_count):
                        qvec[w] = queries[qi * w_count + w]
                    heap = heaps[qi]
                    top = heap[0] >> POS_BITS
                    for s in range(t0, t1, SUB):
                        e = min(s + SUB, t1)
                        blk = db[s * w_count : e * w_count]
                        lowest = np.uint64(1 << 30)
                        for j in range(e - s):
                            d = np.uint64(0)
                            for w in range(w_count):
                                d += popcount64(qvec[w] ^ blk[j * w_count + w])
                            lowest = min(lowest, d)
                        if np.int64(lowest) >= top:
                            continue
                        for j in range(e - s):
                            p = s + j
                            if masked and ((live[p >> 6] >> np.uint64(p & 63)) & 1) == 0:
                                continue
                            d = np.uint64(0)
                            for w in range(w_count):
                                d += popcount64(qvec[w] ^ blk[j * w_count + w])
                            if np.int64(d) < top:
                                heap_replace_top(heap, (np.int64(d) << POS_BITS) | (s + j))
                                top = heap[0] >> POS_BITS

    @numba.njit(inline="always", nogil=True, cache=True, boundscheck=False, fastmath=True)
    def coarse_of(qvec: np.ndarray, blk: np.ndarray, planes: np.ndarray, j: int) -> np.int64:
        """The coarse weighted distance of code j of the block (see asym_scan)."""
        coarse = np.uint64(0)
        for w in range(w_count):
            x = qvec[w] ^ blk[j * w_count + w]
            for plane in range(PLANES):
                coarse += popcount64(x & planes[plane, w]) << np.uint64(plane)
        return np.int64(coarse)

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=True)
    def asym_scan(
        queries: np.ndarray,
        db: np.ndarray,
        start: int,
        stop: int,
        heaps: np.ndarray,
        live: np.ndarray,
        tables: np.ndarray,
        planes: np.ndarray,
        units: np.ndarray,
        radius: np.ndarray,
    ) -> None:
        """knn_scan by weighted distance (indexes/asymmetric.py): keys (wd << POS_BITS) | pos.

        `queries` are the packed signs; tables (m, n_bytes, 256) int32 the weight of each byte
        value of each byte of the XOR; planes (m, PLANES, n_words) uint64 the bits of each
        weight divided by units (m,) and rounded down (a number below 2**PLANES), so that
        `coarse`, the sum of those over the bits that differ, times the unit, is a lower bound
        of the weighted distance that PLANES popcounts compute; radius (m,) the largest Hamming
        distance a hit may have. A vectorised pass finds the blocks of 64 codes with a bound
        below the heap's top, then their codes whose bound is; only they are summed exactly (a
        code whose bound reaches the top cannot enter: a tie loses on position, the scan goes
        in insertion order).
        """
        m = heaps.shape[0]
        n_bytes = tables.shape[1]
        n_bits = n_bytes * 8
        masked = live.shape[0] > 0
        tile = max(SUB, (TILE_BYTES // (8 * w_count)) // SUB * SUB)
        qvec = np.empty(w_count, np.uint64)
        for qb in range(0, m, QUERY_BLOCK):
            qe = min(qb + QUERY_BLOCK, m)
            for t0 in range(start, stop, tile):
                t1 = min(t0 + tile, stop)
                for qi in range(qb, qe):
                    for w in range(w_count):
                        qvec[w] = queries[qi * w_count + w]
                    heap = heaps[qi]
                    table = tables[qi]
                    plane = planes[qi]
                    unit = units[qi]
                    r = radius[qi]
                    top = heap[0] >> POS_BITS
                    limit = (top + unit - 1) // unit  # coarse >= limit: unit * coarse >= top
                    for s in range(t0, t1, 64):
                        e = min(s + 64, t1)
                        blk = db[s * w_count : e * w_count]
                        # Vectorised (LLVM vectorises only a constant trip count, hence the
                        # two forms): the block's smallest bound, then, in the rare block where
                        # it is below the top, which of its codes are.
                        lowest = np.int64(1 << 62)
                        if e - s == 64:
                            for j in range(64):
                                lowest = min(lowest, coarse_of(qvec, blk, plane, j))
                        else:
                            for j in range(e - s):
                                lowest = min(lowest, coarse_of(qvec, blk, plane, j))
                        if lowest >= limit:
                            continue
                        below = np.uint64(0)
                        for j in range(e - s):
                            passes = coarse_of(qvec, blk, plane, j) < limit
                            below |= np.uint64(passes) << np.uint64(j)
                        while below:
                            j = popcount64((below & (~below + np.uint64(1))) - np.uint64(1))
                            below &= below - np.uint64(1)
                            p = s + np.int64(j)
                            if masked and ((live[p >> 6] >> np.uint64(p & 63)) & 1) == 0:
                                continue
                            if r < n_bits:
                                d = np.uint64(0)
                                for w in range(w_count):
                                    d += popcount64(qvec[w] ^ blk[j * w_count + w])
                                if np.int64(d) > r:
                                    continue
                            wd = np.int64(0)
                            for byte in range(n_bytes):
                                x = qvec[byte >> 3] ^ blk[j * w_count + (byte >> 3)]
                                wd += table[byte, (x >> np.uint64(8 * (byte & 7))) & np.uint64(255)]
                            key = (wd << POS_BITS) | p
                            if key < heap[0]:
                                heap_replace_top(heap, key)
                                top = heap[0] >> POS_BITS
                                limit = (top + unit - 1) // unit

    @numba.njit(nogil=True, cache=True, boundscheck=False, fastmath=True)
    def range_count(queries: np.ndarray, db: np.ndarray, radius: int, counts: np.ndarray) -> None:
        """counts[i] = how many db codes lie within `radius` of query i."""
        n = db.shape[0] // w_count
        for qi in range(counts.shape[0]):
            q = queries[qi * w_count : (qi + 1) * w_count]
            c = 0
            for j in range(n):
                d = np.uint64(0)
                for w in range(w_count):
                    d += popcount64(q[w] ^ db[j * w_count + w])
                if np.int64(d) <= radius:
                    c += 1
            counts[qi] = c

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def range_fill(
        queries: np.ndarray,
        db: np.ndarray,
        radius: int,
        offsets: np.ndarray,
        out_pos: np.ndarray,
        out_dist: np.ndarray,
    ) -> None:
        """Write each query's matches into its offsets slice, by distance then position."""
        n = db.shape[0] // w_count
        m = offsets.shape[0] - 1
        hist = np.zeros(radius + 2, np.int64)
        for qi in range(m):
            q = queries[qi * w_count : (qi + 1) * w_count]
            lo = offsets[qi]
            c = 0
            for j in range(n):
                d = np.uint64(0)
                for w in range(w_count):
                    d += popcount64(q[w] ^ db[j * w_count + w])
                if np.int64(d) <= radius:
                    out_pos[lo + c] = j
                    out_dist[lo + c] = d
                    c += 1
            # A stable counting sort by distance keeps positions ascending within a distance.
            hist[:] = 0
            for i in range(lo, lo + c):
                hist[out_dist[i] + 1] += 1
            for r in range(1, radius + 2):
                hist[r] += hist[r - 1]
            tmp_pos = out_pos[lo : lo + c].copy()
            tmp_dist = out_dist[lo : lo + c].copy()
            for i in range(c):
                slot = hist[tmp_dist[i]]
                hist[tmp_dist[i]] += 1
                out_pos[lo + slot] = tmp_pos[i]
                out_dist[lo + slot] = tmp_dist[i]

    return Kernels(
        knn_scan=knn_scan, asym_scan=asym_scan, range_count=range_count, range_fill=range_fill
    )


_KERNELS: dict[int, Kernels] = {}


def kernels_for(words: int) -> Kernels:
    """The kernel set for codes of `words` uint64 words, compiled on first use."""
    found = _KERNELS.get(words)
    if found is None:
        # Two threads may both build; numba's compiler lock makes that safe and one result wins.
        found = _KERNELS.setdefault(words, _build(words))
    return found
