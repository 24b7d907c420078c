"""Side-by-side timings of our indexes and FAISS's on the same codes, and the hardware limits.

faiss-cpu is a dev dependency: this module imports without it, and the benchmarks that need it
raise InputError saying how to install it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numba
import numpy as np

from common.errors import InputError
from indexes.asymmetric import Asymmetric
from indexes.codes import n_words, padding_mask
from indexes.hamming import HammingIndex
from indexes.kernels import popcount64
from indexes.mih import MultiIndexHamming

FAISS: Any
try:
    import faiss as FAISS
except ImportError:  # a production install has no faiss: only the benchmark needs it
    FAISS = None

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
SINGLE_QUERIES = 50  # single-query latency is the median over this many one-query calls
CHUNK = 1 << 17  # rows generated at a time, to bound memory for 10M-code data sets


def random_codes(rng: np.random.Generator, n: int, n_bits: int) -> np.ndarray:
    """(n, n_words) uint64 uniformly random codes."""
    words = n_words(n_bits)
    codes = np.frombuffer(rng.bytes(n * words * 8), dtype=np.uint64).reshape(n, words).copy()
    codes[:, -1] &= ~padding_mask(n_bits)
    return codes


def clustered_codes(
    rng: np.random.Generator, n: int, centres: np.ndarray, *, flip: float
) -> np.ndarray:
    """(n, words) codes: a random one of the (c, words) packed centres, each bit flipped w.p. flip.

    Learned codes are far from uniform: items of one class share most bits.
    """
    words = centres.shape[1]
    out = np.empty((n, words), dtype=np.uint64)
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        noise = rng.random((rows, words * 64), dtype=np.float32) < flip
        packed = np.packbits(noise, axis=1, bitorder="little").view("<u8").astype(np.uint64)
        out[start : start + rows] = centres[rng.integers(0, len(centres), rows)] ^ packed
    return out


def make_data(
    rng: np.random.Generator, *, n: int, n_bits: int, queries: int, clustered: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(database, queries) codes, uniform or from a mixture of n / 1000 centres (10% flips)."""
    if not clustered:
        return random_codes(rng, n, n_bits), random_codes(rng, queries, n_bits)
    centres = random_codes(rng, max(1, n // 1000), n_bits)
    mask = ~padding_mask(n_bits)
    db, qs = (clustered_codes(rng, size, centres, flip=0.1) for size in (n, queries))
    db[:, -1] &= mask
    qs[:, -1] &= mask
    return db, qs


def time_batch(search: Search, queries: np.ndarray, k: int, repeats: int) -> float:
    """Median queries per second of one search call over the whole batch."""
    search(queries[: min(len(queries), 4)], k)  # compile and warm up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        search(queries, k)
        seconds.append(time.perf_counter() - start)
    return float(len(queries) / np.median(seconds))


def time_single(search: Search, queries: np.ndarray, k: int, repeats: int) -> float:
    """Median milliseconds of a one-query search call."""
    search(queries[:1], k)
    seconds = []
    for _ in range(repeats):
        for i in range(min(SINGLE_QUERIES, len(queries))):
            start = time.perf_counter()
            search(queries[i : i + 1], k)
            seconds.append(time.perf_counter() - start)
    return float(np.median(seconds) * 1e3)


def recall(ours: tuple[np.ndarray, np.ndarray], exact: tuple[np.ndarray, np.ndarray]) -> float:
    """Share of the exact top-k found, counting any result at the k-th distance as a hit.

    Ties at the k-th distance may be broken either way, so there only the counts must agree.
    """
    (dists, ids), (true_d, true_i) = ours, exact
    kth = true_d[:, -1:]
    hits = 0
    for row in range(len(ids)):
        inner = true_i[row][true_d[row] < kth[row]]
        hits += np.isin(inner, ids[row]).sum()
        hits += min((true_d[row] == kth[row]).sum(), (dists[row] == kth[row]).sum())
    return float(hits / true_d.size) if true_d.size else 1.0


def require_faiss() -> Any:
    """The faiss module, or InputError saying how to get it."""
    if FAISS is None:
        raise InputError("expected faiss-cpu for the benchmark (pip install faiss-cpu==1.15.1)")
    return FAISS


def faiss_flat(db: np.ndarray, threads: int) -> Search:
    """faiss.IndexBinaryFlat over the same codes (bytes in our bit order), as a Search."""
    lib = require_faiss()
    lib.omp_set_num_threads(threads)
    index = lib.IndexBinaryFlat(db.shape[1] * 64)
    index.add(db.view(np.uint8))

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dists, ids = index.search(queries.view(np.uint8), k)
        return dists.astype(np.int32), ids.astype(np.int64)

    return search


def faiss_multihash(db: np.ndarray, n_tables: int, threads: int) -> Search:
    """faiss.IndexBinaryMultiHash with n_tables hash tables (it probes, then verifies)."""
    lib = require_faiss()
    lib.omp_set_num_threads(threads)
    bits = db.shape[1] * 64
    index = lib.IndexBinaryMultiHash(bits, n_tables, min(bits // n_tables, 63))
    index.add(db.view(np.uint8))

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dists, ids = index.search(queries.view(np.uint8), k)
        return dists.astype(np.int32), ids.astype(np.int64)

    return search


@numba.njit(nogil=True, cache=True)
def _read_sum(words: np.ndarray) -> np.uint64:
    """XOR of every word: one streaming read of the array."""
    acc = np.uint64(0)
    for i in range(words.shape[0]):
        acc ^= words[i]
    return acc


@numba.njit(nogil=True, cache=True, fastmath=True)
def _popcount_sum(words: np.ndarray, rounds: int) -> np.uint64:
    """Sum of popcounts of a cache-resident array, `rounds` times: the popcount ceiling."""
    acc = np.uint64(0)
    for r in range(rounds):
        x = np.uint64(r)
        part = np.uint64(0)  # a per-round sum lets LLVM keep the inner loop vectorised
        for i in range(words.shape[0]):
            part += popcount64(words[i] ^ x)
        acc += part
    return acc


def _run_together(thunks: list[Callable[[], object]]) -> float:
    """Run the thunks in parallel threads; returns the wall seconds until all are done."""
    with ThreadPoolExecutor(len(thunks)) as pool:
        start = time.perf_counter()
        for future in [pool.submit(thunk) for thunk in thunks]:
            future.result()
        return time.perf_counter() - start


def hardware_limits(threads: int) -> dict[str, float]:
    """Measured read bandwidth (GB/s, `threads` threads), copy bandwidth and popcount rate."""
    big = np.ones(1 << 25, dtype=np.uint64)  # 256 MiB: far past every cache
    parts = np.array_split(big, threads)
    _read_sum(parts[0][:1024])
    read_s = [_run_together([partial(_read_sum, p) for p in parts]) for _ in range(3)]
    dst = np.zeros_like(big)
    np.copyto(dst, big)  # the first copy also faults the pages in; time the second
    start = time.perf_counter()
    np.copyto(dst, big)
    copy_gbs = 2 * big.nbytes / (time.perf_counter() - start) / 1e9
    resident = np.arange(2048, dtype=np.uint64)  # 16 KiB: stays in L1
    rounds = 20_000
    _popcount_sum(resident, 1)
    pop_s = [
        _run_together([partial(_popcount_sum, resident, rounds) for _ in range(threads)])
        for _ in range(3)
    ]
    return {
        "read_gbs": big.nbytes / float(np.median(read_s)) / 1e9,
        "copy_gbs_1thread": copy_gbs,
        "popcount_gwords_s": threads * resident.size * rounds / float(np.median(pop_s)) / 1e9,
    }


def bench_index(
    *, n: int, n_bits: int, k: int, queries: int, threads: int, clustered: bool, repeats: int = 3
) -> dict[str, Any]:
    """Ours against faiss.IndexBinaryFlat on the same codes, as the `cmh bench index` JSON."""
    check_sizes(n=n, queries=queries, k=k, threads=threads)
    rng = np.random.default_rng(0)
    db, qs = make_data(rng, n=n, n_bits=n_bits, queries=queries, clustered=clustered)
    ours = HammingIndex(n_bits, threads=threads)
    ours.add(db, np.arange(n, dtype=np.int64))
    theirs = faiss_flat(db, threads)
    result: dict[str, Any] = {"n": n, "bits": n_bits, "k": k, "queries": queries}
    result |= {"threads": threads, "clustered": clustered}
    for name, search in (("ours", ours.search), ("faiss_flat", theirs)):
        result[name] = {
            "single_ms": time_single(search, qs, k, repeats),
            "batch_qps": time_batch(search, qs, k, repeats),
        }
    result["ratio_batch"] = result["ours"]["batch_qps"] / result["faiss_flat"]["batch_qps"]
    result["ratio_single"] = result["faiss_flat"]["single_ms"] / result["ours"]["single_ms"]
    got, exact = ours.search(qs, k), theirs(qs, k)
    result["recall"] = recall(got, exact)
    result["same_distances"] = bool(np.array_equal(got[0], exact[0]))
    limits = hardware_limits(threads)
    bytes_scanned = n * db.shape[1] * 8
    limits["single_ms_floor"] = bytes_scanned / (limits["read_gbs"] * 1e9) * 1e3
    limits["batch_qps_ceiling"] = limits["popcount_gwords_s"] * 1e9 / (n * db.shape[1])
    result["limits"] = limits
    return result


def bench_mih(
    *,
    db: np.ndarray,
    qs: np.ndarray,
    n_bits: int,
    k: int,
    threads: int,
    repeats: int = 3,
) -> dict[str, Any]:
    """Multi-index hashing against flat search and faiss.IndexBinaryMultiHash on given codes."""
    n = len(db)
    check_sizes(n=n, queries=len(qs), k=k, threads=threads)
    ids = np.arange(n, dtype=np.int64)
    flat = HammingIndex(n_bits, threads=threads)
    flat.add(db, ids)
    start = time.perf_counter()
    mih = MultiIndexHamming(n_bits, threads=threads)
    mih.add(db, ids)
    build_s = time.perf_counter() - start
    tables = max(mih.n_tables, math.ceil(db.shape[1] * 64 / 63))
    searches = {
        "flat": flat.search,
        "mih": mih.search,
        "faiss_flat": faiss_flat(db, threads),
        "faiss_multihash": faiss_multihash(db, tables, threads),
    }
    exact = flat.search(qs, k)
    result: dict[str, Any] = {"n": n, "bits": n_bits, "k": k, "queries": len(qs)}
    result |= {"threads": threads, "n_tables": mih.n_tables, "mih_build_s": build_s}
    result["kth_distance_median"] = float(np.median(exact[0][:, -1]))
    for name, search in searches.items():
        result[name] = {
            "single_ms": time_single(search, qs, k, repeats),
            "batch_qps": time_batch(search, qs, k, repeats),
            "recall": recall(search(qs, k), exact),
        }
    return result


def check_sizes(*, n: int, queries: int, k: int, threads: int) -> None:
    """Raise InputError unless every size is at least 1."""
    for name, value in (("n", n), ("queries", queries), ("k", k), ("threads", threads)):
        if value < 1:
            raise InputError(f"expected {name} >= 1, got {value}")


def bench_scoring(
    db: np.ndarray,
    signs: np.ndarray,
    real: np.ndarray,
    *,
    k: int,
    runs: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """Single-query search time of Hamming and asymmetric scoring on one HammingIndex, side by
    side: each query searched both ways in turn (which goes first alternates), medians.

    Keys: n, n_bits, k, queries, runs, threads; p50_us {hamming, asymmetric} (the median over
    runs of each run's median over queries; asymmetric includes building its tables,
    Asymmetric.of, as a request does); ratio_p50 (asymmetric / hamming); per_run {scoring:
    [p50_us per run]}; p90_us {scoring} over every query of every run.
    """
    n_bits = real.shape[1]
    index = HammingIndex.from_arrays(
        n_bits, db, np.arange(db.shape[0], dtype=np.int64), threads=threads
    )

    def hamming(i: int) -> None:
        index.search(signs[i : i + 1], k)

    def asymmetric(i: int) -> None:
        query = signs[i : i + 1]
        index.search(query, k, asymmetric=Asymmetric.of(query, real[i : i + 1]))

    searches: dict[str, Callable[[int], None]] = {"hamming": hamming, "asymmetric": asymmetric}
    for search in searches.values():  # compile and warm up
        search(0)
    per_run: dict[str, list[float]] = {name: [] for name in searches}
    every: dict[str, list[float]] = {name: [] for name in searches}
    for run in range(runs):
        times: dict[str, list[float]] = {name: [] for name in searches}
        for i in range(signs.shape[0]):
            order = list(searches) if (run + i) % 2 == 0 else list(searches)[::-1]
            for name in order:
                start = time.perf_counter()
                searches[name](i)
                times[name].append((time.perf_counter() - start) * 1e6)
        for name in searches:
            per_run[name].append(float(np.median(times[name])))
            every[name] += times[name]
    p50 = {name: float(np.median(per_run[name])) for name in searches}
    return {
        "n": int(db.shape[0]),
        "n_bits": int(n_bits),
        "k": k,
        "queries": int(signs.shape[0]),
        "runs": runs,
        "threads": index.threads,
        "p50_us": p50,
        "ratio_p50": p50["asymmetric"] / p50["hamming"],
        "p90_us": {name: float(np.percentile(every[name], 90)) for name in searches},
        "per_run": per_run,
    }
