"""Multi-index hashing gives exactly HammingIndex's results: distances, ids and tie order."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.errors import InputError
from indexes.codes import pack_codes
from indexes.hamming import HammingIndex
from indexes.mih import MultiIndexHamming, default_tables


def clustered(rng: np.random.Generator, n: int, n_bits: int, flip: float) -> np.ndarray:
    """(n, n_words) codes: 20 random centres with each bit flipped with probability `flip`."""
    centres = rng.integers(0, 2, size=(20, n_bits), dtype=np.uint8)
    noise = (rng.random((n, n_bits)) < flip).astype(np.uint8)
    return pack_codes(centres[rng.integers(0, 20, size=n)] ^ noise)


def assert_same(mih: MultiIndexHamming, flat: HammingIndex, queries: np.ndarray, k: int) -> None:
    got, want = mih.search(queries, k), flat.search(queries, k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("budget", [None, 1])  # 1: (almost) every query goes to flat search
@pytest.mark.parametrize("table_bits", [None, 5, 24])
@pytest.mark.parametrize("n_bits", [16, 64, 128, 72])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_matches_flat_search(
    n: int, n_bits: int, table_bits: int | None, budget: int | None
) -> None:
    n_tables = None if table_bits is None else math.ceil(n_bits / table_bits)
    rng = np.random.default_rng(n + n_bits)
    codes = clustered(rng, n, n_bits, 0.1)
    codes[n // 2 : n // 2 + 5] = codes[:5] if n >= 10 else codes[n // 2 : n // 2 + 5]
    ids = rng.permutation(4 * n + 4)[:n].astype(np.int64)
    mih = MultiIndexHamming(n_bits, n_tables=n_tables, work_budget=budget, threads=2)
    flat = HammingIndex(n_bits)
    mih.add(codes, ids)
    flat.add(codes, ids)
    queries = np.concatenate([codes[:3], clustered(rng, 9, n_bits, 0.2)])
    for k in (1, 10, n + 5):
        assert_same(mih, flat, queries, k)


@pytest.mark.parametrize("budget", [None, 10**9])  # 10**9: probe all the way, never give up
def test_uniform_codes_and_removal_match_flat_search(budget: int | None) -> None:
    rng = np.random.default_rng(7)
    codes = pack_codes(rng.integers(0, 2, size=(3000, 64), dtype=np.uint8))
    ids = np.arange(3000, dtype=np.int64)
    mih, flat = MultiIndexHamming(64, work_budget=budget), HammingIndex(64)
    mih.add(codes, ids)
    flat.add(codes, ids)
    queries = pack_codes(rng.integers(0, 2, size=(20, 64), dtype=np.uint8))
    assert_same(mih, flat, queries, 50)
    assert mih.remove(ids[::2]) == flat.remove(ids[::2]) == 1500
    assert len(mih) == 1500
    assert_same(mih, flat, queries, 50)
    np.testing.assert_array_equal(mih.contains(ids[:4]), [False, True, False, True])


def test_duplicates_are_rejected_and_leave_the_index_unchanged() -> None:
    mih = MultiIndexHamming(32)
    mih.add(np.zeros((2, 1), dtype=np.uint64), np.array([1, 2], dtype=np.int64))
    with pytest.raises(InputError, match="already in the index"):
        mih.add(np.zeros((1, 1), dtype=np.uint64), np.array([2], dtype=np.int64))
    assert len(mih) == 2


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(InputError, match="expected n_tables in 1..64, got 0"):
        MultiIndexHamming(64, n_tables=0)
    with pytest.raises(InputError, match="expected substrings of at most 24 bits"):
        MultiIndexHamming(64, n_tables=1)
    with pytest.raises(InputError, match="expected work_budget >= 1, got 0"):
        MultiIndexHamming(64, work_budget=0)
    with pytest.raises(InputError, match="expected k as an int >= 1"):
        MultiIndexHamming(64).search(np.zeros((1, 1), dtype=np.uint64), 0)


def test_default_tables_follow_log2_n() -> None:
    assert default_tables(64, 1_000_000) == 3
    assert default_tables(128, 10_000_000) == 6
    assert default_tables(64, 0) == 64 and default_tables(256, 10**6) == 13


def test_range_search_matches_flat() -> None:
    rng = np.random.default_rng(5)
    codes = pack_codes(rng.integers(0, 2, (500, 64)))
    ids = rng.permutation(5000)[:500].astype(np.int64)
    mih, flat = MultiIndexHamming(64), HammingIndex(64)
    mih.add(codes, ids)
    flat.add(codes, ids)
    got_all, want_all = mih.range_search(codes[:9], 28), flat.range_search(codes[:9], 28)
    assert len(got_all) == 9 and any(len(w[1]) > 1 for w in want_all)
    for got, want in zip(got_all, want_all, strict=True):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
