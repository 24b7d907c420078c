"""Retrieval metrics over ranked databases: MAP@all, MAP@R, P@K, R@K and precision-recall curves.

Conventions shared by every function here:

- Relevant means the query and the item share at least one label (`labels` are (n, C) multi-hot).
- A ranking sorts the database by ascending distance (Hamming for codes, 1 - cosine for real
  vectors). Ties are broken by one fixed permutation of the database drawn from `seed`, the same
  for every query, so the order inside a tie never correlates with labels or with input order.
- A query with no relevant item in the database scores 0 (AP, precision, recall) and still counts
  in the mean over queries: no ranking can serve it, and dropping it would let a method's score
  depend on which queries happen to be answerable. This is also what the reference evaluation code
  of the cross-modal hashing literature does (DCMH, DJSRH: such queries add 0 and the sum is
  divided by the number of queries).

Worked example (the docstring case the tests check): one query, a database of three items with
distances [0, 1, 1] and relevance [True, False, True]. Whatever the tie order, item 0 comes first.
If item 2 precedes item 1, the relevant items sit at ranks 1 and 2: AP = (1/1 + 2/2) / 2 = 1.0.
If item 1 precedes item 2, they sit at ranks 1 and 3: AP = (1/1 + 2/3) / 2 = 5/6.

`cmh evaluate` reports, per direction (score_direction in protocol.py, from one ranking of each
query block, `ranked_scores`): MAP@all (the headline), MAP@R, P@K and R@K for K in 1, 10, 100,
instance-level Recall@K (`partner_ranks`) and the precision-recall curve. Definitions:

- MAP@R (Musgrave, Belongie and Lim, "A Metric Learning Reality Check", ECCV 2020): R is the
  number of relevant items of the query in the database, and AP@R = sum_{k <= R} P(k) rel(k) / R.
  The divisor is R itself, not the hits found in the top R, so a perfect top R scores 1 and half
  of it at most 1/2. `average_precisions(top=...)` is the other variant (a fixed depth, divided
  by the hits within it); the two are never mixed in one table, nor with MAP@all.
- P@K = relevant in the top K / K and R@K = relevant in the top K / relevant in the database;
  where K exceeds the database, the missing ranks count as not relevant.
- Instance Recall@K (the metric of the Flickr30K / MS-COCO tables): the fraction of queries whose
  own paired item (the other modality of the same pair) ranks in the top K. Labels play no part.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from common.errors import InputError

# Queries are ranked in blocks so that an (n_query, n_db) sort never has to fit in memory at once.
_BLOCK = 256


def hamming_distances(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Hamming distances (n_query, n_db) int32 between codes in {-1, +1}: (L - <q, d>) / 2."""
    _check_codes(query_codes, "query_codes")
    _check_codes(db_codes, "db_codes")
    if query_codes.shape[1] != db_codes.shape[1]:
        raise InputError(
            f"expected codes of one length, got {query_codes.shape[1]} and {db_codes.shape[1]} bits"
        )
    # float32 BLAS is exact here: inner products are integers of magnitude at most L << 2**24.
    inner = query_codes.astype(np.float32) @ db_codes.astype(np.float32).T  # (n_query, n_db)
    return np.asarray((query_codes.shape[1] - inner.astype(np.int32)) // 2, dtype=np.int32)


def cosine_distances(query: np.ndarray, db: np.ndarray) -> np.ndarray:
    """1 - cosine similarity (n_query, n_db) float64 between real-valued rows; zero rows give 1."""
    if query.ndim != 2 or db.ndim != 2 or query.shape[1] != db.shape[1]:
        raise InputError(
            f"expected two 2-d arrays of equal width, got {query.shape} and {db.shape}"
        )
    q = _unit_rows(query.astype(np.float64))
    d = _unit_rows(db.astype(np.float64))
    return np.asarray(1.0 - q @ d.T, dtype=np.float64)


def relevance(query_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    """(n_query, n_db) bool: True where the query and the item share at least one label."""
    if query_labels.ndim != 2 or db_labels.ndim != 2 or query_labels.shape[1] != db_labels.shape[1]:
        raise InputError(
            "expected (n, C) label arrays with one C, got "
            f"{query_labels.shape} and {db_labels.shape}"
        )
    shared = (query_labels > 0).astype(np.int64) @ (db_labels > 0).astype(np.int64).T
    return shared > 0


def tie_break_order(n_db: int, *, seed: int) -> np.ndarray:
    """The fixed permutation (n_db,) int64 that decides the order of items at equal distance."""
    return np.random.default_rng(seed).permutation(n_db).astype(np.int64)


def rank(dists: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Database indices (n_query, n_db) int64 by ascending distance, ties by `tie_break_order`."""
    if dists.ndim != 2:
        raise InputError(f"expected a 2-d distance matrix, got shape {dists.shape}")
    perm = tie_break_order(dists.shape[1], seed=seed)
    # A stable sort over the permuted columns keeps the permutation's order inside every tie.
    return perm[np.argsort(dists[:, perm], axis=1, kind="stable")]


def average_precisions(
    dists: np.ndarray, relevant: np.ndarray, *, top: int | None = None, seed: int = 0
) -> np.ndarray:
    """Per-query average precision (n_query,) float64 over the top `top` ranks (None: all).

    AP@R = sum_{k <= R} P(k) rel(k) / (number of relevant items in the top R); with top=None this
    is AP over the whole ranked database. A query with nothing relevant in the top R scores 0.
    """
    _check_pair(dists, relevant)
    n_db = dists.shape[1]
    depth = n_db if top is None else top
    if not 1 <= depth <= n_db:
        raise InputError(f"expected top in 1..{n_db}, got {top}")
    positions = np.arange(1, depth + 1, dtype=np.float64)  # (depth,)
    out = np.empty(dists.shape[0], dtype=np.float64)
    for rows, rel in _ranked_relevance(dists, relevant, seed=seed):
        rel = rel[:, :depth]  # (b, depth)
        hits = np.cumsum(rel, axis=1)  # (b, depth)
        n_hits = hits[:, -1]
        summed = np.sum(np.where(rel, hits / positions, 0.0), axis=1)
        out[rows] = np.divide(summed, n_hits, out=np.zeros_like(summed), where=n_hits > 0)
    return out


@dataclass(frozen=True)
class RankedScores:
    """Per-query metrics of one ranking (see the module docstring for each definition)."""

    ap: np.ndarray  # (n_query,) float64, AP over the whole ranked database (MAP@all's terms)
    ap_r: np.ndarray  # (n_query,) float64, AP@R with R = the query's relevant count
    precision: np.ndarray  # (n_query, len(ks)) float64, P@K
    recall: np.ndarray  # (n_query, len(ks)) float64, R@K


def ranked_scores(
    dists: np.ndarray, relevant: np.ndarray, *, ks: np.ndarray, seed: int = 0
) -> RankedScores:
    """AP, AP@R, P@K and R@K of every query from one ranking (K >= 1, any K; see module)."""
    _check_pair(dists, relevant)
    ks = np.asarray(ks, dtype=np.int64)
    if ks.ndim != 1 or ks.size == 0 or ks.min() < 1:
        raise InputError(f"expected a non-empty list of K >= 1, got {ks.tolist()}")
    n_query, n_db = dists.shape
    # Beyond the database nothing more is found: hits at K > n_db are the hits at n_db.
    at = np.minimum(ks, n_db) - 1
    positions = np.arange(1, n_db + 1, dtype=np.float64)  # (n_db,)
    ap = np.empty(n_query, dtype=np.float64)
    ap_r = np.empty(n_query, dtype=np.float64)
    precision = np.empty((n_query, ks.size), dtype=np.float64)
    recall = np.empty((n_query, ks.size), dtype=np.float64)
    for rows, rel in _ranked_relevance(dists, relevant, seed=seed):
        hits = np.cumsum(rel, axis=1)  # (b, n_db)
        n_rel = hits[:, -1]  # (b,)
        # The same expression as average_precisions, so MAP@all is the same to the last bit.
        terms = np.where(rel, hits / positions, 0.0)  # (b, n_db)
        summed = np.sum(terms, axis=1)
        ap[rows] = np.divide(summed, n_rel, out=np.zeros_like(summed), where=n_rel > 0)
        within_r = positions[None, :] <= n_rel[:, None]  # (b, n_db): rank k <= R
        summed_r = np.sum(np.where(within_r, terms, 0.0), axis=1)
        ap_r[rows] = np.divide(summed_r, n_rel, out=np.zeros_like(summed_r), where=n_rel > 0)
        found = hits[:, at]  # (b, len(ks))
        precision[rows] = found / ks
        recall[rows] = np.divide(
            found, n_rel[:, None], out=np.zeros(found.shape), where=n_rel[:, None] > 0
        )
    return RankedScores(ap=ap, ap_r=ap_r, precision=precision, recall=recall)


def partner_ranks(dists: np.ndarray, partners: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """The 1-based rank (n_query,) int64 of each query's own item `partners[i]` in its ranking.

    `dists` (n_query, n_gallery) ranks a gallery; ties follow `tie_break_order(n_gallery, seed)`,
    as in `rank`, but no sort is needed: the rank is 1 + the items strictly closer + the items at
    equal distance that the tie order puts first.
    """
    if dists.ndim != 2 or partners.shape != (dists.shape[0],):
        raise InputError(
            f"expected a (n_query, n_gallery) matrix and n_query partners, got {dists.shape} and "
            f"{partners.shape}"
        )
    n_gallery = dists.shape[1]
    if partners.size and (partners.min() < 0 or partners.max() >= n_gallery):
        raise InputError(f"expected partners in 0..{n_gallery - 1}, got {partners.tolist()[:5]}")
    order = np.empty(n_gallery, dtype=np.int64)
    order[tie_break_order(n_gallery, seed=seed)] = np.arange(n_gallery)  # position in tie order
    rows = np.arange(dists.shape[0])
    own = dists[rows, partners][:, None]  # (n_query, 1)
    ahead = (dists < own) | ((dists == own) & (order[None, :] < order[partners][:, None]))
    return np.asarray(1 + ahead.sum(axis=1), dtype=np.int64)


def radius_curves(
    dists: np.ndarray, relevant: np.ndarray, *, n_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query precision and recall (n_query, n_bits + 1) within Hamming radius r = 0..L.

    Precision is NaN where a query retrieves nothing within r; recall is 0 for a query with no
    relevant item. Ties do not matter here: a radius retrieves a whole tie or none of it.
    """
    _check_pair(dists, relevant)
    if dists.size and (dists.min() < 0 or dists.max() > n_bits):
        raise InputError(
            f"expected Hamming distances in 0..{n_bits}, got {dists.min()}..{dists.max()}"
        )
    shape = (dists.shape[0], n_bits + 1)
    precision = np.empty(shape, dtype=np.float64)
    recall = np.empty(shape, dtype=np.float64)
    for start in range(0, dists.shape[0], _BLOCK):
        rows = slice(start, start + _BLOCK)
        d = dists[rows].astype(np.int64)
        rel = relevant[rows]
        # Counts per distance, then cumulative over the radius: (b, n_bits + 1).
        found = np.cumsum(_count_by_distance(d, np.ones_like(rel), n_bits), axis=1)
        hits = np.cumsum(_count_by_distance(d, rel, n_bits), axis=1)
        n_rel = rel.sum(axis=1, keepdims=True)
        precision[rows] = np.divide(hits, found, out=np.full(hits.shape, np.nan), where=found > 0)
        recall[rows] = np.divide(hits, n_rel, out=np.zeros(hits.shape), where=n_rel > 0)
    return precision, recall


def mean_curve(precision: np.ndarray, recall: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average per-query curves (n_query, n_points): precision over the queries where it is
    defined (NaN where it is nowhere defined), recall over all queries."""
    defined = ~np.isnan(precision)
    count = defined.sum(axis=0)
    total = np.where(defined, precision, 0.0).sum(axis=0)
    mean_precision = np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)
    return mean_precision, recall.mean(axis=0)


def _count_by_distance(d: np.ndarray, weight: np.ndarray, n_bits: int) -> np.ndarray:
    """(b, n_bits + 1): for each query, the summed weight of items at each distance."""
    b = d.shape[0]
    flat = (d + np.arange(b)[:, None] * (n_bits + 1)).ravel()
    counts = np.bincount(
        flat, weights=weight.ravel().astype(np.float64), minlength=b * (n_bits + 1)
    )
    return counts.reshape(b, n_bits + 1)


def _ranked_relevance(
    dists: np.ndarray, relevant: np.ndarray, *, seed: int
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (query rows, relevance in rank order (b, n_db) bool) block by block."""
    for start in range(0, dists.shape[0], _BLOCK):
        rows = slice(start, start + _BLOCK)
        yield rows, np.take_along_axis(relevant[rows], rank(dists[rows], seed=seed), axis=1)


def _check_codes(codes: np.ndarray, name: str) -> None:
    if codes.ndim != 2:
        raise InputError(f"expected {name} of shape (n, n_bits), got {codes.shape}")
    if codes.size and not np.all(np.abs(codes) == 1):
        raise InputError(f"expected {name} in {{-1, +1}}, got values {np.unique(codes)[:5]}")


def _check_pair(dists: np.ndarray, relevant: np.ndarray) -> None:
    if dists.ndim != 2 or dists.shape != relevant.shape:
        raise InputError(
            f"expected distances and relevance of one (n_query, n_db) shape, got "
            f"{dists.shape} and {relevant.shape}"
        )
    if dists.shape[1] == 0:
        raise InputError("expected a non-empty database, got 0 items")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.asarray(np.divide(x, norms, out=np.zeros_like(x), where=norms > 0))
