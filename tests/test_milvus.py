"""The brute-force oracle tests every index backend shares, and MilvusHammingIndex's own tests.

The shared tests (`make_index`) run on HammingIndex in memory, on MilvusHammingIndex over
embedded milvus-lite (a local .db file) and, when CMH_TEST_MILVUS_URI names a Milvus server (for
example http://localhost:19530 from `docker compose --profile milvus up`), on it too.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import InputError
from indexes.codes import n_words, pack_codes
from indexes.hamming import HammingIndex
from indexes.milvus import (
    MAX_K,
    MilvusHammingIndex,
    from_milvus_bytes,
    milvus_dim,
    to_milvus_bytes,
)
from indexes.results import PAD_DIST, SearchIndex
from tests.helpers import brute_force, random_packed

SERVER_URI = os.environ.get("CMH_TEST_MILVUS_URI")


@pytest.fixture(scope="module")
def lite_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One milvus-lite database file for this module."""
    return str(tmp_path_factory.mktemp("milvus") / "test.db")


def server_uri() -> str:
    """The server in CMH_TEST_MILVUS_URI, or skip."""
    if not SERVER_URI:
        pytest.skip("no Milvus server: set CMH_TEST_MILVUS_URI=http://host:19530 to test one")
    return SERVER_URI


@pytest.fixture(scope="module", params=["lite", "server"])
def milvus_uri(request: pytest.FixtureRequest) -> str:
    """A Milvus URI: the module's milvus-lite file, or the server in CMH_TEST_MILVUS_URI."""
    return server_uri() if request.param == "server" else str(request.getfixturevalue("lite_db"))


def milvus_factory(uri: str) -> Iterator[object]:
    """Yield a factory of Milvus indexes in fresh collections; drop them afterwards."""
    made: list[MilvusHammingIndex] = []

    def make(n_bits: int) -> MilvusHammingIndex:
        with warnings.catch_warnings():
            # milvus-lite 2.5.1 imports pkg_resources, which warns that it is deprecated.
            warnings.simplefilter("ignore", UserWarning)
            index = MilvusHammingIndex(n_bits, uri=uri, collection=f"t_{uuid.uuid4().hex}")
        made.append(index)
        return index

    yield make
    for index in made:
        index.drop()
        index.close()


@pytest.fixture
def make_milvus_index(milvus_uri: str) -> Iterator[object]:
    """A factory of Milvus indexes (milvus-lite, and a server when given)."""
    yield from milvus_factory(milvus_uri)


@pytest.fixture(params=["memory", "lite", "server"])
def make_index(request: pytest.FixtureRequest) -> Iterator[object]:
    """A factory of empty indexes of every backend: the shared oracle tests take this one."""
    if request.param == "memory":
        yield HammingIndex
        return
    uri = server_uri() if request.param == "server" else str(request.getfixturevalue("lite_db"))
    yield from milvus_factory(uri)


def test_byte_layout_round_trips_and_keeps_every_distance() -> None:
    rng = np.random.default_rng(0)
    for n_bits in (8, 48, 64, 128, 200):
        packed = random_packed(rng, 50, n_bits)
        vectors = to_milvus_bytes(packed, n_bits)
        assert vectors.shape == (50, milvus_dim(n_bits) // 8) and vectors.dtype == np.uint8
        np.testing.assert_array_equal(from_milvus_bytes(vectors, n_bits), packed)
        ours = np.bitwise_count(packed[:, None] ^ packed[None]).sum(axis=2)
        theirs = np.bitwise_count(vectors[:, None] ^ vectors[None]).sum(axis=2)
        np.testing.assert_array_equal(ours, theirs)
    # Milvus dimension i (most significant bit first) is our bit 8 * (i // 8) + 7 - i % 8.
    bits = rng.integers(0, 2, size=(3, 64), dtype=np.uint8)
    milvus_dims = np.unpackbits(to_milvus_bytes(pack_codes(bits), 64), axis=1)  # bitorder big
    perm = np.array([8 * (i // 8) + 7 - i % 8 for i in range(64)])
    np.testing.assert_array_equal(milvus_dims, bits[:, perm])


@pytest.mark.parametrize("n_bits", [16, 64, 128, 200])
@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_search_matches_brute_force(make_index, n: int, n_bits: int) -> None:
    rng = np.random.default_rng(n * 1000 + n_bits)
    codes = random_packed(rng, n, n_bits)
    ids = rng.permutation(10 * n + 10)[:n].astype(np.int64)
    queries = random_packed(rng, 13, n_bits)
    index = make_index(n_bits)
    index.add(codes, ids)
    assert len(index) == n
    for k in (1, 10, n + 5):
        dists, got_ids = index.search(queries, k)
        want_d, want_i = brute_force(queries, codes, ids, k)
        assert dists.dtype == np.int32 and got_ids.dtype == np.int64
        np.testing.assert_array_equal(dists, want_d)
        np.testing.assert_array_equal(got_ids, want_i)


def test_ties_follow_insertion_order_not_id_order(make_index) -> None:
    code = pack_codes(np.ones((1, 64), dtype=np.int8))
    index = make_index(64)
    index.add(np.repeat(code, 5, axis=0), np.array([40, 10, 30, 20, 50], dtype=np.int64))
    index.add(code, np.array([5], dtype=np.int64))  # a later add ties after the earlier ones
    dists, ids = index.search(code, 3)
    np.testing.assert_array_equal(ids, [[40, 10, 30]])
    np.testing.assert_array_equal(dists, [[0, 0, 0]])
    dists, ids = index.search(code, 6)
    np.testing.assert_array_equal(ids, [[40, 10, 30, 20, 50, 5]])


def test_empty_index_and_empty_batch_are_padded(make_index) -> None:
    index = make_index(32)
    dists, ids = index.search(np.zeros((2, 1), dtype=np.uint64), 4)
    assert (ids == -1).all() and (dists == PAD_DIST).all() and ids.shape == (2, 4)
    dists, ids = index.search(np.zeros((0, 1), dtype=np.uint64), 4)
    assert dists.shape == (0, 4) and ids.shape == (0, 4)


def test_duplicate_and_bad_input_are_rejected_and_index_left_unchanged(
    make_milvus_index,
) -> None:
    rng = np.random.default_rng(2)
    index = make_milvus_index(64)
    index.add(random_packed(rng, 3, 64), np.array([1, 2, 3], dtype=np.int64))
    with pytest.raises(InputError, match="expected unique ids, got id 7 more than once"):
        index.add(random_packed(rng, 3, 64), np.array([7, 8, 7], dtype=np.int64))
    with pytest.raises(InputError, match="expected new ids, got id 2 already in the index"):
        index.add(random_packed(rng, 2, 64), np.array([9, 2], dtype=np.int64))
    with pytest.raises(InputError, match="expected ids as an int64 numpy array, got int32"):
        index.add(random_packed(rng, 2, 64), np.array([9, 2], dtype=np.int32))
    with pytest.raises(InputError, match="expected queries of dtype uint64"):
        index.search(np.zeros((1, 8), dtype=np.uint8), 1)
    with pytest.raises(InputError, match=f"expected k <= {MAX_K} with the Milvus backend"):
        index.search(np.zeros((1, 1), dtype=np.uint64), MAX_K + 1)
    with pytest.raises(InputError, match="expected radius as an int >= 0, got -1"):
        index.range_search(np.zeros((1, 1), dtype=np.uint64), -1)
    np.testing.assert_array_equal(index.ids, [1, 2, 3])
    assert index.codes.shape == (3, 1)


def test_remove_then_search_matches_brute_force_on_the_rest(make_index) -> None:
    rng = np.random.default_rng(3)
    codes = random_packed(rng, 500, 64)
    codes[250:260] = codes[0]  # ties whose order must survive the removal
    ids = rng.permutation(5000)[:500].astype(np.int64)
    index = make_index(64)
    index.add(codes, ids)
    gone = np.concatenate([ids[::3], np.array([999_999], dtype=np.int64)])  # one absent id
    assert index.remove(gone) == len(ids[::3])
    assert index.remove(gone) == 0
    keep = np.ones(500, dtype=bool)
    keep[::3] = False
    np.testing.assert_array_equal(index.ids, ids[keep])
    np.testing.assert_array_equal(index.codes, codes[keep])
    np.testing.assert_array_equal(index.contains(ids), keep)
    queries = np.concatenate([codes[:1], random_packed(rng, 5, 64)])
    for k in (1, 20, 400):
        got = index.search(queries, k)
        want = brute_force(queries, codes[keep], ids[keep], k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    index.add(codes[:1], ids[:1])  # a removed id may come back, at the end
    assert index.ids[-1] == ids[0]


@pytest.mark.parametrize("n_bits", [16, 64, 128])
def test_range_search_matches_brute_force(make_index, n_bits: int) -> None:
    rng = np.random.default_rng(n_bits)
    codes = random_packed(rng, 800, n_bits)
    ids = np.arange(800, dtype=np.int64) * 3
    index = make_index(n_bits)
    index.add(codes, ids)
    queries = np.concatenate([codes[:2], random_packed(rng, 5, n_bits)])
    dist = np.bitwise_count(queries[:, None, :] ^ codes[None]).sum(axis=2)
    for radius in (0, n_bits // 3, n_bits // 2, 10 * n_bits):
        results = index.range_search(queries, radius)
        assert len(results) == len(queries)
        for row, (got_d, got_i) in zip(dist, results, strict=True):
            hits = np.flatnonzero(row <= radius)
            hits = hits[np.argsort(row[hits], kind="stable")]
            np.testing.assert_array_equal(got_d, row[hits])
            np.testing.assert_array_equal(got_i, ids[hits])


def test_save_load_round_trips_with_hamming_index(
    make_milvus_index, milvus_uri: str, tmp_path: Path
) -> None:
    rng = np.random.default_rng(6)
    codes = random_packed(rng, 300, 128)
    ids = rng.permutation(3000)[:300].astype(np.int64)
    queries = random_packed(rng, 9, 128)
    index = make_milvus_index(128)
    index.add(codes, ids)
    index.save(tmp_path / "from-milvus.hidx")
    memory = HammingIndex.load(tmp_path / "from-milvus.hidx")
    np.testing.assert_array_equal(memory.ids, ids)
    np.testing.assert_array_equal(memory.codes, codes)
    want = memory.search(queries, 25)
    copied = MilvusHammingIndex.load(
        tmp_path / "from-milvus.hidx", uri=milvus_uri, collection=f"t_{uuid.uuid4().hex}"
    )
    try:
        for got in (index.search(queries, 25), copied.search(queries, 25)):
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    finally:
        copied.drop()
        copied.close()


def test_reopening_checks_the_collection(make_milvus_index, milvus_uri: str) -> None:
    index = make_milvus_index(64)
    index.add(np.zeros((2, n_words(64)), dtype=np.uint64), np.array([5, 6], dtype=np.int64))
    again = MilvusHammingIndex(64, uri=milvus_uri, collection=index.collection)
    np.testing.assert_array_equal(again.ids, [5, 6])
    again.add(np.zeros((1, 1), dtype=np.uint64), np.array([7], dtype=np.int64))
    again.close()
    np.testing.assert_array_equal(index.ids, [5, 6, 7])  # the reopened index appends after
    with pytest.raises(InputError, match="to be a 128-bit index"):
        MilvusHammingIndex(128, uri=milvus_uri, collection=index.collection)


def test_every_backend_is_a_search_index(make_index) -> None:
    """One interface (indexes.results.SearchIndex) for HammingIndex and MilvusHammingIndex."""
    index = make_index(64)
    assert isinstance(index, SearchIndex) and index.n_bits == 64
