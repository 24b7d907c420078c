"""Exact Hamming search in a Milvus collection: the byte layout and the top-k with ties.

The Milvus backend of the store (store/milvus_store.py) keeps each item's codes as
BINARY_VECTOR fields with a BIN_FLAT index and the HAMMING metric, so every search is exact,
and an INT64 `seq` field (insertion order, for ties). Its results are those of HammingIndex:
by distance, ties in insertion order.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from pymilvus import MilvusClient

from indexes.codes import n_words

# Milvus refuses a search limit (top-k) or a query page above this (its quota default).
TOPK_LIMIT = 16384
MAX_K = TOPK_LIMIT - 1  # a search asks for k + 1 hits to see whether the k-th is a tie
RESULT_BUDGET = 1 << 18  # queries per request times hits per query


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


def vector_bytes(value: Any) -> bytes:
    """A BINARY_VECTOR as bytes: pymilvus returns it as bytes or as a one-element list of bytes."""
    if isinstance(value, list):
        value = value[0]
    if not isinstance(value, bytes):
        raise TypeError(
            f"expected a binary vector as bytes from Milvus, got {type(value).__name__}"
        )
    return value


def rows_and_vectors(
    page: Sequence[dict[str, Any]], field: str, width: int
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The rows of a Milvus query result, and their BINARY_VECTOR `field` as one (n, width)
    uint8 array (row i, vector i); the rows' own value of `field` is not to be read.

    pymilvus 2.5 (its HybridExtraList) keeps a result's vectors in one protobuf bytes field and
    fills a row's vector when the row is first read, by slicing that field; and each read of
    the field copies all of it. Reading n rows so copies the whole column n times: for a page
    of 4,096 64-bit codes, 4,096 copies of 32 KB, half of a 100,000-code scan's time (850 ms
    through the query iterator, 410 ms when each page's column is read once; milvus-lite
    2.5.1, pymilvus 2.5.18). Where the result is such a list, the column is read once and the
    rows as they were decoded, without their vector; any other result (another pymilvus) is
    read row by row, as before. tests/test_asymmetric.py checks that the pinned pymilvus takes
    the first way, and that both give the same vectors.
    """
    for data in getattr(page, "_lazy_field_data", None) or ():
        if getattr(data, "field_name", None) != field:
            continue
        raw = data.vectors.binary_vector
        if isinstance(page, list) and isinstance(raw, bytes) and len(raw) == len(page) * width:
            rows: list[dict[str, Any]] = list(list.__iter__(page))  # not materialised
            return rows, np.frombuffer(raw, dtype=np.uint8).reshape(len(page), width)
    rows = list(page)
    joined = b"".join(vector_bytes(row[field]) for row in rows)
    return rows, np.frombuffer(joined, dtype=np.uint8).reshape(len(rows), width)


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
