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
    hamming_distances,
    precision_recall_at,
    precision_recall_by_radius,
    relevance,
)

METRIC = "map@all"  # the one MAP variant every table of this project reports
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
    radius, so theirs follows rank cut-offs K from 1 to the database size.
    """
    rel = relevance(query_labels, db_labels)  # (n_query, n_db)
    if real_valued:
        dists = cosine_distances(query, db)
        n_db = dists.shape[1]
        ks = np.unique(np.linspace(1, n_db, min(_CUTOFF_POINTS, n_db)).round().astype(np.int64))
        precision, recall = precision_recall_at(dists, rel, ks=ks, seed=seed)
        curve = Curve(precision=precision, recall=recall, by="rank")
    else:
        dists = hamming_distances(query, db)
        precision, recall = precision_recall_by_radius(dists, rel, n_bits=query.shape[1])
        curve = Curve(precision=precision, recall=recall, by="hamming radius")
    map_all = float(np.mean(average_precisions(dists, rel, seed=seed)))
    return DirectionScore(map_all=map_all, curve=curve)


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
