"""indexes/milvus.py, the Milvus backend's search: the byte layout keeps every distance, and
exact_top_k equals brute force with ties in insertion order, on embedded milvus-lite (a local
.db file) and, when CMH_TEST_MILVUS_URI names a Milvus server (for example http://localhost:19530
from `docker compose --profile milvus up`), on it too. MilvusStore's own tests, which search
through these, are in tests/test_milvus_store.py."""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from indexes.codes import pack_codes
from indexes.milvus import exact_top_k, milvus_dim, to_milvus_bytes
from tests.helpers import brute_force, random_packed

SERVER_URI = os.environ.get("CMH_TEST_MILVUS_URI")


@pytest.fixture(scope="module", params=["lite", "server"])
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MilvusClient]:
    """A Milvus client: on a milvus-lite file of this module, or the server in
    CMH_TEST_MILVUS_URI (skipped without one)."""
    if request.param == "server":
        if not SERVER_URI:
            pytest.skip("no Milvus server: set CMH_TEST_MILVUS_URI=http://host:19530 to test one")
        uri = SERVER_URI
    else:
        uri = str(tmp_path_factory.mktemp("milvus") / "test.db")
    with warnings.catch_warnings():
        # milvus-lite 2.5.1 imports pkg_resources, which warns that it is deprecated.
        warnings.simplefilter("ignore", UserWarning)
        milvus = MilvusClient(uri=uri, alias=f"cmh-test-{uuid.uuid4().hex}")
    yield milvus
    milvus.close()


def collection_of(client: MilvusClient, n_bits: int, codes: np.ndarray, ids: np.ndarray) -> str:
    """A new collection as the store lays one out (an INT64 `seq`, a BIN_FLAT HAMMING vector)
    holding codes under ids, inserted in order (seq = row number)."""
    name = f"t_{uuid.uuid4().hex}"
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("seq", DataType.INT64)
    schema.add_field("code", DataType.BINARY_VECTOR, dim=milvus_dim(n_bits))
    index = client.prepare_index_params()
    index.add_index(field_name="code", index_type="BIN_FLAT", metric_type="HAMMING")
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
    vectors = to_milvus_bytes(codes, n_bits)
    rows = [
        {"id": int(ids[i]), "seq": i, "code": vectors[i].tobytes()} for i in range(ids.shape[0])
    ]
    if rows:
        client.insert(name, rows)
    return name


def top_k(
    client: MilvusClient, name: str, queries: np.ndarray, n_bits: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """exact_top_k's hits as brute_force's (dists, ids) arrays, padded the same way."""
    hits = exact_top_k(client, name, to_milvus_bytes(queries, n_bits), k, anns_field="code")
    dists = np.full((queries.shape[0], k), np.iinfo(np.int32).max, dtype=np.int32)
    ids = np.full((queries.shape[0], k), -1, dtype=np.int64)
    for row, found in enumerate(hits):
        dists[row, : len(found)] = [hit.dist for hit in found]
        ids[row, : len(found)] = [int(hit.id) for hit in found]
    return dists, ids


def test_byte_layout_keeps_every_distance() -> None:
    rng = np.random.default_rng(0)
    for n_bits in (8, 48, 64, 128, 200):
        packed = random_packed(rng, 50, n_bits)
        vectors = to_milvus_bytes(packed, n_bits)
        assert vectors.shape == (50, milvus_dim(n_bits) // 8) and vectors.dtype == np.uint8
        ours = np.bitwise_count(packed[:, None] ^ packed[None]).sum(axis=2)
        theirs = np.bitwise_count(vectors[:, None] ^ vectors[None]).sum(axis=2)
        np.testing.assert_array_equal(ours, theirs)
    # Milvus dimension i (most significant bit first) is our bit 8 * (i // 8) + 7 - i % 8.
    bits = rng.integers(0, 2, size=(3, 64), dtype=np.uint8)
    milvus_dims = np.unpackbits(to_milvus_bytes(pack_codes(bits), 64), axis=1)  # bitorder big
    perm = np.array([8 * (i // 8) + 7 - i % 8 for i in range(64)])
    np.testing.assert_array_equal(milvus_dims, bits[:, perm])


@pytest.mark.parametrize("n_bits", [16, 64, 200])
def test_exact_top_k_equals_brute_force(client: MilvusClient, n_bits: int) -> None:
    rng = np.random.default_rng(n_bits)
    codes = random_packed(rng, 300, n_bits)
    codes[100:200] = codes[:100]  # every code of the first hundred twice: ties at every depth
    ids = rng.permutation(3000)[:300].astype(np.int64)
    queries = np.concatenate([random_packed(rng, 8, n_bits), codes[:5]])
    name = collection_of(client, n_bits, codes, ids)
    try:
        for k in (1, 10, 305):
            np.testing.assert_array_equal(
                np.stack(top_k(client, name, queries, n_bits, k)),
                np.stack(brute_force(queries, codes, ids, k)),
            )
    finally:
        client.drop_collection(name)


def test_boundary_ties_keep_the_first_inserted_not_the_smallest_ids(client: MilvusClient) -> None:
    code = pack_codes(np.ones((1, 64), dtype=np.int8))
    far = pack_codes(np.zeros((1, 64), dtype=np.int8))
    codes = np.concatenate([np.repeat(code, 6, axis=0), far])
    ids = np.array([40, 10, 30, 20, 50, 5, 1], dtype=np.int64)
    name = collection_of(client, 64, codes, ids)
    try:
        dists, found = top_k(client, name, code, 64, 3)
        np.testing.assert_array_equal(found, [[40, 10, 30]])
        np.testing.assert_array_equal(dists, [[0, 0, 0]])
        dists, found = top_k(client, name, code, 64, 7)
        np.testing.assert_array_equal(found, [[40, 10, 30, 20, 50, 5, 1]])
        np.testing.assert_array_equal(dists, [[0, 0, 0, 0, 0, 0, 64]])
    finally:
        client.drop_collection(name)
