"""The evaluation protocol: seeds, both retrieval directions, and what one run records.

Image-to-text (i2t) ranks the text codes of the database by their distance to an image query's
code; text-to-image (t2i) the other way round. Queries and database are disjoint, as the dataset's
protocol defines them; this module only scores the codes it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import InputError
from evaluation.metrics import (
    average_precisions,
    cosine_distances,
    cutoff_curves,
    hamming_distances,
    mean_curve,
    radius_curves,
    relevance,
)

METRIC = "map@all"  # the one MAP variant every table of this project reports
QUERY_BLOCK = 128  # queries scored at once: 128 x 200k database items is about 100 MB a matrix
_CUTOFF_POINTS = 64  # rank cut-offs along a real-valued method's precision-recall curve


@dataclass(frozen=True)
class Curve:
    """A precision-recall curve; `by` says what moves along it ("hamming radius" or "rank")."""

    precision: np.ndarray  # (n_points,) float64, NaN where undefined
    recall: np.ndarray  # (n_points,) float64
    by: str


@dataclass(frozen=True)
class DirectionScore:
    """MAP@all and the precision-recall curve of one retrieval direction."""

    map_all: float
    curve: Curve


@dataclass(frozen=True)
class RunResult:
    """One method at one code length and seed, scored in both directions."""

    method: str
    bits: int
    seed: int
    i2t: DirectionScore
    t2i: DirectionScore


def run_seeds(n_seeds: int) -> list[int]:
    """The seeds of `n_seeds` repeated runs: 0, 1, ..., n_seeds - 1."""
    if n_seeds < 1:
        raise InputError(f"expected at least 1 seed, got {n_seeds}")
    return list(range(n_seeds))


def validation_split(
    train_idx: np.ndarray, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split training rows into (fit_idx, val_idx) by a seeded permutation; both sorted.

    Hyper-parameters are chosen on val_idx (held out of the training part), never on the queries.
    """
    n_val = int(round(fraction * train_idx.size))
    if not 0 < n_val < train_idx.size:
        raise InputError(
            f"expected a validation fraction leaving both parts non-empty for {train_idx.size} "
            f"training rows, got {fraction}"
        )
    order = np.random.default_rng(seed).permutation(train_idx.size)
    return np.sort(train_idx[order[n_val:]]), np.sort(train_idx[order[:n_val]])


def score_direction(
    query: np.ndarray,
    db: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    real_valued: bool,
    seed: int,
) -> DirectionScore:
    """Score one direction: Hamming ranking for codes in {-1,+1}, cosine for real vectors.

    Binary codes get the precision-recall curve over Hamming radius 0..L; real vectors have no
    radius, so theirs follows rank cut-offs K from 1 to the database size. Queries go in blocks,
    so memory stays at a block's (QUERY_BLOCK, n_db) matrices whatever the number of queries.
    """
    if query.shape[0] != query_labels.shape[0] or db.shape[0] != db_labels.shape[0]:
        raise InputError(
            f"expected one label row per item, got {query.shape[0]} queries with "
            f"{query_labels.shape[0]} labels and {db.shape[0]} items with {db_labels.shape[0]}"
        )
    n_db = db.shape[0]
    ks = np.unique(np.linspace(1, n_db, min(_CUTOFF_POINTS, n_db)).round().astype(np.int64))
    aps, precisions, recalls = [], [], []
    for start in range(0, query.shape[0], QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        rel = relevance(query_labels[block], db_labels)  # (b, n_db)
        if real_valued:
            dists = cosine_distances(query[block], db)
            precision, recall = cutoff_curves(dists, rel, ks=ks, seed=seed)
        else:
            dists = hamming_distances(query[block], db)
            precision, recall = radius_curves(dists, rel, n_bits=query.shape[1])
        aps.append(average_precisions(dists, rel, seed=seed))
        precisions.append(precision)
        recalls.append(recall)
    mean_precision, mean_recall = mean_curve(np.vstack(precisions), np.vstack(recalls))
    curve = Curve(
        precision=mean_precision,
        recall=mean_recall,
        by="rank" if real_valued else "hamming radius",
    )
    return DirectionScore(map_all=float(np.mean(np.concatenate(aps))), curve=curve)


def score_run(
    *,
    method: str,
    bits: int,
    seed: int,
    image_query: np.ndarray,
    text_query: np.ndarray,
    image_db: np.ndarray,
    text_db: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    real_valued: bool,
) -> RunResult:
    """Score a method's query and database encodings in both directions (ties seeded by `seed`)."""
    i2t = score_direction(
        image_query, text_db, query_labels, db_labels, real_valued=real_valued, seed=seed
    )
    t2i = score_direction(
        text_query, image_db, query_labels, db_labels, real_valued=real_valued, seed=seed
    )
    return RunResult(method=method, bits=bits, seed=seed, i2t=i2t, t2i=t2i)
