"""HammingIndex against brute-force NumPy: top-k, threads, bad input, views.

Ties, padding, removal and radius search are checked for every backend in test_milvus.py.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from common.errors import InputError
from indexes import hamming
from indexes.codes import n_words
from indexes.hamming import SPLIT_MIN_WORDS, HammingIndex, LiveMask
from tests.helpers import brute_force, random_packed


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n_bits", [16, 64, 128, 200])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_search_matches_brute_force(n: int, n_bits: int, threads: int) -> None:
    rng = np.random.default_rng(n * 1000 + n_bits)
    codes = random_packed(rng, n, n_bits)
    ids = rng.permutation(10 * n + 10)[:n].astype(np.int64)
    queries = random_packed(rng, 13, n_bits)
    index = HammingIndex(n_bits, threads=threads)
    index.add(codes, ids)
    assert len(index) == n
    for k in (1, 10, n + 5):
        dists, got_ids = index.search(queries, k)
        want_d, want_i = brute_force(queries, codes, ids, k)
        assert dists.dtype == np.int32 and got_ids.dtype == np.int64
        np.testing.assert_array_equal(dists, want_d)
        np.testing.assert_array_equal(got_ids, want_i)


SPLIT_BITS = 512  # codes of the split tests
SPLIT_WORDS = SPLIT_BITS // 64


def test_single_query_split_over_threads_matches_brute_force() -> None:
    rng = np.random.default_rng(5)
    n = SPLIT_MIN_WORDS // SPLIT_WORDS + 4321  # long codes: a split database in few rows
    codes = random_packed(rng, n, SPLIT_BITS)
    codes[::997] = codes[0]  # many exact ties spread over both halves
    ids = np.arange(n, dtype=np.int64)[::-1].copy()
    index = HammingIndex(SPLIT_BITS, threads=2)
    index.add(codes, ids)
    queries = np.concatenate([codes[:1], random_packed(rng, 1, SPLIT_BITS)])
    for q in queries:
        dists, got_ids = index.search(q[None, :], 100)
        want_d, want_i = brute_force(q[None, :], codes, ids, 100)
        np.testing.assert_array_equal(dists, want_d)
        np.testing.assert_array_equal(got_ids, want_i)


def test_a_search_while_another_scans_stays_on_its_own_thread_and_is_exact() -> None:
    rng = np.random.default_rng(6)
    n = SPLIT_MIN_WORDS // SPLIT_WORDS + 999
    codes = random_packed(rng, n, SPLIT_BITS)
    codes[::501] = codes[3]  # ties across the pieces the split makes
    ids = np.arange(n, dtype=np.int64)
    index = HammingIndex(SPLIT_BITS, threads=2)
    index.add(codes, ids)
    query = codes[3:4]
    want = brute_force(query, codes, ids, 50)

    class Counting(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
            Counting.submitted += 1
            return super().submit(*args, **kwargs)

    plan = index._plan(query, 50, None)
    with Counting(1) as pool:
        hamming._drain_all(pool, 2, plan.jobs)  # alone: a piece goes to the pool thread
        assert Counting.submitted == 1
        np.testing.assert_array_equal(plan.finish(), want)
        plan = index._plan(query, 50, None)
        hamming._IN_FLIGHT.enter()  # another search is scanning
        try:
            hamming._drain_all(pool, 2, plan.jobs)
        finally:
            hamming._IN_FLIGHT.leave()
        assert Counting.submitted == 1  # every piece of this one ran on the calling thread
        np.testing.assert_array_equal(plan.finish(), want)


def test_duplicate_ids_are_rejected_and_index_left_unchanged() -> None:
    rng = np.random.default_rng(2)
    index = HammingIndex(64)
    index.add(random_packed(rng, 3, 64), np.array([1, 2, 3], dtype=np.int64))
    with pytest.raises(InputError, match="expected unique ids, got id 7 more than once"):
        index.add(random_packed(rng, 3, 64), np.array([7, 8, 7], dtype=np.int64))
    with pytest.raises(InputError, match="expected new ids, got id 2 already in the index"):
        index.add(random_packed(rng, 2, 64), np.array([9, 2], dtype=np.int64))
    np.testing.assert_array_equal(index.ids, [1, 2, 3])
    assert index.codes.shape == (3, 1)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (np.array([1, 2], dtype=np.int32), "expected ids as an int64 numpy array, got int32"),
        (np.array([[1, 2]], dtype=np.int64), r"expected ids of shape \(2,\), got shape \(1, 2\)"),
        (np.array([1, -1], dtype=np.int64), "expected ids >= 0"),
    ],
)
def test_bad_ids_are_rejected(ids: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=message):
        HammingIndex(64).add(np.zeros((2, 1), dtype=np.uint64), ids)


def test_bad_queries_and_k_are_rejected() -> None:
    index = HammingIndex(128)
    with pytest.raises(InputError, match="expected queries of dtype uint64"):
        index.search(np.zeros((1, 16), dtype=np.uint8), 1)
    with pytest.raises(InputError, match=r"expected queries of shape \(n, 2\) for 128-bit"):
        index.search(np.zeros((1, 1), dtype=np.uint64), 1)
    with pytest.raises(InputError, match="expected k as an int >= 1, got 0"):
        index.search(np.zeros((1, 2), dtype=np.uint64), 0)
    with pytest.raises(InputError, match="expected radius as an int >= 0, got -1"):
        index.range_search(np.zeros((1, 2), dtype=np.uint64), -1)
    with pytest.raises(InputError, match="bits past bit 48 set to 0"):
        HammingIndex(48).search(np.full((1, 1), 1 << 50, dtype=np.uint64), 1)


def test_concurrent_searches_agree_with_a_serial_one() -> None:
    rng = np.random.default_rng(4)
    index = HammingIndex(128, threads=2)
    index.add(random_packed(rng, 20_000, 128), np.arange(20_000, dtype=np.int64))
    queries = random_packed(rng, 64, 128)
    want_d, want_i = index.search(queries, 10)
    results: list[tuple[int, np.ndarray, np.ndarray]] = []

    def work() -> None:
        for chunk in range(8):
            dists, ids = index.search(queries[chunk * 8 : (chunk + 1) * 8], 10)
            results.append((chunk, dists, ids))

    workers = [threading.Thread(target=work) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(results) == 32
    for chunk, dists, ids in results:
        np.testing.assert_array_equal(dists, want_d[chunk * 8 : (chunk + 1) * 8])
        np.testing.assert_array_equal(ids, want_i[chunk * 8 : (chunk + 1) * 8])


def test_views_are_read_only() -> None:
    index = HammingIndex(64)
    index.add(np.zeros((2, n_words(64)), dtype=np.uint64), np.array([5, 6], dtype=np.int64))
    with pytest.raises(ValueError, match="read-only"):
        index.ids[0] = 1


@pytest.mark.parametrize("n_bits", [64, 128])
def test_search_with_a_live_mask_equals_brute_force_over_the_live_codes(n_bits: int) -> None:
    rng = np.random.default_rng(7)
    n = 5000
    # Few distinct codes: ties everywhere, so the tie order among live codes is checked too.
    pool = rng.integers(0, 2**63, size=(40, n_words(n_bits)), dtype=np.int64).astype(np.uint64)
    codes = pool[rng.integers(0, 40, n)]
    ids = rng.permutation(n).astype(np.int64) * 3
    index = HammingIndex(n_bits)
    index.add(codes, ids)
    live = rng.random(n) < 0.3
    mask = LiveMask.of(live)
    assert mask.count == int(live.sum()) and np.array_equal(mask.to_bool(), live)
    queries = pool[:5]
    for k in (1, 10, int(live.sum()) + 4):
        dists, got = index.search(queries, k, live=mask)
        for q in range(queries.shape[0]):
            d = np.bitwise_count(codes ^ queries[q]).sum(axis=1)
            order = np.lexsort((np.arange(n), d))
            order = order[live[order]][:k]
            assert got[q, : order.size].tolist() == ids[order].tolist()
            assert dists[q, : order.size].tolist() == d[order].tolist()
            assert (got[q, order.size :] == -1).all()
    fewer = mask.without(np.flatnonzero(live)[:10])
    assert fewer.count == mask.count - 10 and mask.count == int(live.sum())  # a copy
    with pytest.raises(InputError, match="live mask of 5000 codes"):
        index.search(queries, 3, live=LiveMask.all_live(10))
