"""MilvusHammingIndex: the HammingIndex interface over a Milvus collection, for scale-out.

One collection holds one index: `id` INT64 (primary key), `seq` INT64 (insertion order, for
ties) and `code` BINARY_VECTOR with a BIN_FLAT index and the HAMMING metric, so every search
is exact. Results are the same as HammingIndex's: (dists int32 (m, k), ids int64 (m, k)) by
distance, ties in insertion order, padded with int32 max and -1 past the index size.

Byte layout: Milvus takes a binary vector of dim bits as dim / 8 bytes. We send the
little-endian bytes of our packed words (indexes/codes.py), cut to ceil(n_bits / 8) bytes, so
byte b carries code bits 8b..8b+7, bit j at bit j % 8 counted from the least significant bit.
Milvus numbers dimensions from the most significant bit of each byte (as np.packbits does by
default), so its dimension i is our bit 8 * (i // 8) + 7 - i % 8. That only permutes bits
within each byte, the same way for stored codes and queries, so every Hamming distance is
unchanged; bits past n_bits are 0 on both sides and add nothing.

Ties: Milvus orders equal distances arbitrarily. A search asks for k + 1 hits; when the
(k + 1)-th ties with the k-th, it fetches every code at that boundary distance with a range
search and keeps those inserted first. That is exact as long as at most TOPK_LIMIT codes share
the boundary distance; beyond that the boundary ties are some of the tied codes (still at the
right distance), which is the only way results can differ from HammingIndex.

Consistency: the collection uses Milvus's Strong level, so a search sees every add and remove
that returned before it. An add of many codes is sent in batches after all checks pass; only a
server failure part-way can leave part of a batch added (the in-memory index never does).

Over 300 lines because it is one backend's whole mapping (collection schema, writes, search,
range search, the shared search tail and its errors) onto the HammingIndex interface.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pymilvus import DataType, MilvusClient

from common.errors import InputError
from indexes import storage
from indexes.codes import check_packed, n_words
from indexes.hamming import check_ids, check_k
from indexes.results import padded

logger = logging.getLogger(__name__)

# Milvus refuses a search limit (top-k) or a query page above this (its quota default).
TOPK_LIMIT = 16384
MAX_K = TOPK_LIMIT - 1  # a search asks for k + 1 hits to see whether the k-th is a tie
INSERT_BATCH = 10_000
FILTER_BATCH = 1_000  # ids per `id in [...]` expression
RESULT_BUDGET = 1 << 18  # queries per request times hits per query
DESCRIPTION = "cmh hamming index n_bits={n_bits}"


def to_milvus_bytes(packed: np.ndarray, n_bits: int) -> np.ndarray:
    """(n, n_words) uint64 packed codes -> (n, ceil(n_bits / 8)) uint8 Milvus binary vectors."""
    as_bytes = np.ascontiguousarray(packed).astype("<u8", copy=False).view(np.uint8)
    return as_bytes.reshape(packed.shape[0], n_words(n_bits) * 8)[:, : milvus_dim(n_bits) // 8]


def from_milvus_bytes(vectors: np.ndarray, n_bits: int) -> np.ndarray:
    """(n, ceil(n_bits / 8)) uint8 Milvus vectors -> (n, n_words) uint64; inverse of the above."""
    words = n_words(n_bits)
    out = np.zeros((vectors.shape[0], words * 8), dtype=np.uint8)
    out[:, : vectors.shape[1]] = vectors
    return out.view("<u8").astype(np.uint64, copy=False)


def milvus_dim(n_bits: int) -> int:
    """The BINARY_VECTOR dim for n_bits-bit codes: Milvus needs a multiple of 8."""
    n_words(n_bits)  # the same range check as every other index
    return -(-n_bits // 8) * 8


class Hit(NamedTuple):
    """One Milvus search hit: Hamming distance, insertion seq, primary key, requested fields."""

    dist: int
    seq: int
    id: int | str
    entity: dict[str, Any]


def search_hits(
    client: MilvusClient,
    collection: str,
    vectors: np.ndarray,
    *,
    anns_field: str,
    limit: int,
    radius: tuple[int, int] | None = None,
    expr: str = "",
    output_fields: Sequence[str] = (),
    timeout: int
    | None = None,  # whole seconds: pymilvus ignores a float (see store/milvus_store.py)
) -> list[list[Hit]]:
    """Hits of each (m, bytes) uint8 query vector sorted by (dist, seq); radius is [low, high).

    `expr` is a Milvus boolean expression over scalar fields; the caller builds it from checked
    values only (store/milvus_store.py). Each collection must have an INT64 `seq` field.
    """
    params: dict[str, Any] = {"metric_type": "HAMMING"}
    if radius is not None:
        params["params"] = {"range_filter": radius[0], "radius": radius[1]}
    fields = ["seq", *output_fields]
    out: list[list[Hit]] = []
    step = max(1, RESULT_BUDGET // limit)
    for start in range(0, vectors.shape[0], step):
        chunk = vectors[start : start + step]
        found = client.search(
            collection,
            data=[v.tobytes() for v in chunk],
            filter=expr,
            limit=limit,
            anns_field=anns_field,
            search_params=params,
            output_fields=fields,
            timeout=timeout,
        )
        for hits in found:
            rows = [
                Hit(int(hit["distance"]), int(hit["entity"]["seq"]), hit["id"], hit["entity"])
                for hit in hits
            ]
            rows.sort(key=lambda hit: (hit.dist, hit.seq))
            out.append(rows)
    return out


def exact_top_k(
    client: MilvusClient,
    collection: str,
    vectors: np.ndarray,
    k: int,
    *,
    anns_field: str,
    expr: str = "",
    output_fields: Sequence[str] = (),
    timeout: int
    | None = None,  # whole seconds: pymilvus ignores a float (see store/milvus_store.py)
) -> list[list[Hit]]:
    """The exact k nearest hits of each query, ties in seq order (see the module docstring).

    Asks for k + 1 hits; where the (k + 1)-th ties with the k-th, a range search at that
    boundary distance fetches every tied hit, and those with the smallest seqs are kept.
    """

    def run(v: np.ndarray, limit: int, radius: tuple[int, int] | None) -> list[list[Hit]]:
        return search_hits(
            client, collection, v, anns_field=anns_field, limit=limit, radius=radius,
            expr=expr, output_fields=output_fields, timeout=timeout,
        )  # fmt: skip

    hits = run(vectors, k + 1, None)
    # Queries whose k-th and (k+1)-th hits tie, grouped by that boundary distance.
    boundary: dict[int, list[int]] = {}
    for row, found in enumerate(hits):
        if len(found) > k and found[k].dist == found[k - 1].dist:
            boundary.setdefault(found[k - 1].dist, []).append(row)
        else:
            hits[row] = found[:k]
    for dist, rows in boundary.items():
        tied = run(vectors[rows], TOPK_LIMIT, (dist, dist + 1))
        for row, group in zip(rows, tied, strict=True):
            nearer = [hit for hit in hits[row] if hit.dist < dist]
            hits[row] = nearer + group[: k - len(nearer)]
    return hits


class MilvusHammingIndex:
    """Exact Hamming index in a Milvus collection; same interface and results as HammingIndex."""

    def __init__(self, n_bits: int, *, uri: str, collection: str, token: str = "") -> None:
        """Open `collection` at `uri` (a server URL, or a local .db file for milvus-lite).

        Creates the collection when it is missing. Raises InputError when it exists but was
        made for other codes.
        """
        self.n_words = n_words(n_bits)
        self.n_bits = int(n_bits)
        self.collection = collection
        # A private connection: pymilvus shares one per URI, and close() would end it for all.
        self._client = MilvusClient(uri=uri, token=token, alias=f"cmh-{uuid.uuid4().hex}")
        self._last_seq = 0
        if self._client.has_collection(collection):
            self._check_collection()
        else:
            self._create_collection()

    def _create_collection(self) -> None:
        schema = MilvusClient.create_schema(
            auto_id=False,
            enable_dynamic_field=False,
            description=DESCRIPTION.format(n_bits=self.n_bits),
        )
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("seq", DataType.INT64)
        schema.add_field("code", DataType.BINARY_VECTOR, dim=milvus_dim(self.n_bits))
        index_params = self._client.prepare_index_params()
        index_params.add_index(field_name="code", index_type="BIN_FLAT", metric_type="HAMMING")
        self._client.create_collection(
            self.collection, schema=schema, index_params=index_params, consistency_level="Strong"
        )
        logger.info("created Milvus collection %s for %d-bit codes", self.collection, self.n_bits)

    def _check_collection(self) -> None:
        found = self._client.describe_collection(self.collection)
        want = DESCRIPTION.format(n_bits=self.n_bits)
        names = sorted(field["name"] for field in found.get("fields", []))
        if found.get("description") != want or names != ["code", "id", "seq"]:
            raise InputError(
                f"expected Milvus collection {self.collection!r} to be a {self.n_bits}-bit "
                f"index ({want!r}, fields code, id, seq), got {found.get('description')!r} "
                f"with fields {names}"
            )
        self._client.load_collection(self.collection)

    def __len__(self) -> int:
        """How many codes the collection holds."""
        rows = self._client.query(self.collection, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def __repr__(self) -> str:
        return f"MilvusHammingIndex(n_bits={self.n_bits}, collection={self.collection!r})"

    @property
    def ids(self) -> np.ndarray:
        """(n,) int64 ids in insertion order (read-only; read from the server on each access)."""
        return self._export()[0]

    @property
    def codes(self) -> np.ndarray:
        """(n, n_words) uint64 codes in insertion order (read-only; read from the server)."""
        return self._export()[1]

    def _export(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (id, seq, code) row, sorted by seq: (ids (n,), codes (n, n_words))."""
        rows: list[dict[str, Any]] = []
        it = self._client.query_iterator(
            self.collection, batch_size=INSERT_BATCH, output_fields=["id", "seq", "code"]
        )
        while batch := it.next():
            rows.extend(batch)
        it.close()
        rows.sort(key=lambda row: int(row["seq"]))
        ids = np.fromiter((int(row["id"]) for row in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(vector_bytes(row["code"]) for row in rows), np.uint8)
        codes = from_milvus_bytes(
            vectors.reshape(len(rows), milvus_dim(self.n_bits) // 8), self.n_bits
        )
        ids.flags.writeable = False
        codes.flags.writeable = False
        return ids, codes

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids),) bool: which of the int64 ids are in the index."""
        check_ids(ids)
        present = self._present(np.unique(ids))
        return np.isin(ids, present)

    def _present(self, ids: np.ndarray) -> np.ndarray:
        """The ids (unique, int64) that the collection holds."""
        found: list[int] = []
        for start in range(0, ids.shape[0], FILTER_BATCH):
            chunk = ids[start : start + FILTER_BATCH].tolist()
            rows = self._client.query(
                self.collection, filter=f"id in {chunk}", output_fields=["id"]
            )
            found.extend(int(row["id"]) for row in rows)
        return np.asarray(found, dtype=np.int64)

    def add(self, codes: np.ndarray, ids: np.ndarray) -> None:
        """Append (n, n_words) uint64 codes under int64 ids.

        Raises InputError for a wrong dtype or shape, or an id that repeats or is already in
        the index; nothing is sent then.
        """
        check_packed(codes, self.n_bits, name="codes")
        check_ids(ids, n=codes.shape[0])
        if ids.size == 0:
            return
        sorted_ids = np.sort(ids)
        repeats = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if repeats.size:
            raise InputError(
                f"expected unique ids, got id {int(sorted_ids[repeats[0]])} more than once"
            )
        present = self._present(sorted_ids)
        if present.size:
            raise InputError(f"expected new ids, got id {int(present.min())} already in the index")
        # Nanosecond clock: insertion order stays increasing across processes and reopenings.
        first = max(time.time_ns(), self._last_seq + 1)
        self._last_seq = first + ids.shape[0] - 1
        vectors = to_milvus_bytes(codes, self.n_bits)
        for start in range(0, ids.shape[0], INSERT_BATCH):
            stop = min(start + INSERT_BATCH, ids.shape[0])
            rows = [
                {"id": int(ids[i]), "seq": first + i, "code": vectors[i].tobytes()}
                for i in range(start, stop)
            ]
            self._client.insert(self.collection, rows)

    def remove(self, ids: np.ndarray) -> int:
        """Remove the codes of these int64 ids (absent ids are ignored); returns how many went."""
        check_ids(ids)
        gone = self._present(np.unique(ids))
        for start in range(0, gone.shape[0], FILTER_BATCH):
            self._client.delete(self.collection, ids=gone[start : start + FILTER_BATCH].tolist())
        return int(gone.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest codes of each (m, n_words) uint64 query.

        Returns (dists, ids), both (m, k): int32 Hamming distances ascending and int64 ids,
        ties in insertion order, padded with int32 max and -1 past the index size.
        Raises InputError for a wrong dtype or shape, k < 1 or k > MAX_K.
        """
        check_packed(queries, self.n_bits, name="queries")
        check_k(k)
        if k > MAX_K:
            raise InputError(f"expected k <= {MAX_K} with the Milvus backend, got {k}")
        k = int(k)
        m = queries.shape[0]
        dists, out_ids = padded(m, k)
        vectors = to_milvus_bytes(queries, self.n_bits)
        hits = exact_top_k(self._client, self.collection, vectors, k, anns_field="code")
        for row, found in enumerate(hits):
            if found:
                dists[row, : len(found)] = [hit.dist for hit in found]
                out_ids[row, : len(found)] = [int(hit.id) for hit in found]
        return dists, out_ids

    def range_search(self, queries: np.ndarray, radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every code within Hamming distance `radius` of each (m, n_words) uint64 query.

        Returns m pairs (dists int32 (r_i,), ids int64 (r_i,)), by distance then insertion order.
        Raises InputError when a query has TOPK_LIMIT or more codes within the radius.
        """
        check_packed(queries, self.n_bits, name="queries")
        if isinstance(radius, bool) or not isinstance(radius, int | np.integer) or radius < 0:
            raise InputError(f"expected radius as an int >= 0, got {radius!r}")
        radius = min(int(radius), self.n_bits)
        vectors = to_milvus_bytes(queries, self.n_bits)
        results = []
        for found in search_hits(
            self._client,
            self.collection,
            vectors,
            anns_field="code",
            limit=TOPK_LIMIT,
            radius=(0, radius + 1),
        ):
            if len(found) >= TOPK_LIMIT:
                raise InputError(
                    f"expected fewer than {TOPK_LIMIT} codes within radius {radius} "
                    "(the Milvus result limit), got more; use a smaller radius"
                )
            results.append(
                (
                    np.asarray([hit.dist for hit in found], dtype=np.int32),
                    np.asarray([int(hit.id) for hit in found], dtype=np.int64),
                )
            )
        return results

    def save(self, path: Path) -> None:
        """Write the index to `path` in HammingIndex's file format (HammingIndex.load reads it)."""
        ids, codes = self._export()
        storage.save(Path(path), n_bits=self.n_bits, ids=ids, codes=codes)
        logger.info("saved %d codes of %d bits from %s to %s", len(ids), self.n_bits, self, path)

    @classmethod
    def load(cls, path: Path, *, uri: str, collection: str, token: str = "") -> MilvusHammingIndex:
        """Add the codes of an index file (HammingIndex's format) to a new or empty collection.

        Raises InputError for a bad file, or ids the collection already holds.
        """
        n_bits, ids, codes = storage.load(Path(path), mmap=True)
        index = cls(n_bits, uri=uri, collection=collection, token=token)
        index.add(np.ascontiguousarray(codes), np.ascontiguousarray(ids))
        logger.info("loaded %d codes of %d bits from %s into %s", len(ids), n_bits, path, index)
        return index

    def drop(self) -> None:
        """Delete the collection and everything in it on the server."""
        self._client.drop_collection(self.collection)
        logger.info("dropped Milvus collection %s", self.collection)

    def close(self) -> None:
        """Close the connection (the collection stays on the server)."""
        self._client.close()


def vector_bytes(value: Any) -> bytes:
    """A BINARY_VECTOR as bytes: pymilvus returns it as bytes or as a one-element list of bytes."""
    if isinstance(value, list):
        value = value[0]
    if not isinstance(value, bytes):
        raise TypeError(
            f"expected a binary vector as bytes from Milvus, got {type(value).__name__}"
        )
    return value
