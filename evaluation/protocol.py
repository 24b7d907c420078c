"""The evaluation protocol: seeds, both retrieval directions, and what one run records.

Image-to-text (i2t) ranks the text codes of the database by their distance to an image query's
code; text-to-image (t2i) the other way round. Queries and database are disjoint, as the dataset's
protocol defines them; this module only scores the codes it is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

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


class Encoder(Protocol):
    """Anything fitted that maps image and text features to codes (or real embeddings)."""

    def encode_image(self, features: np.ndarray) -> np.ndarray: ...

    def encode_text(self, features: np.ndarray) -> np.ndarray: ...


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


def seeded_split(rows: np.ndarray, *, n_held: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held): `n_held` of `rows` held out by one seeded permutation, the rest kept; sorted.

    Every held-out split here is this one (AUCMH's epoch split, each baseline's regulariser
    split, the tuning script's outer split). Callers check 0 < n_held < rows.size in their terms.
    """
    order = np.random.default_rng(seed).permutation(rows.size)
    return np.sort(rows[order[n_held:]]), np.sort(rows[order[:n_held]])


def validation_split(
    train_idx: np.ndarray, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split training rows into (fit_idx, val_idx), val a `fraction` of them (seeded_split).

    Hyper-parameters are chosen on val_idx (held out of the training part), never on the queries.
    """
    n_val = int(round(fraction * train_idx.size))
    if not 0 < n_val < train_idx.size:
        raise InputError(
            f"expected a validation fraction leaving both parts non-empty for {train_idx.size} "
            f"training rows, got {fraction}"
        )
    return seeded_split(train_idx, n_held=n_val, seed=seed)


def _blocks(
    query: np.ndarray,
    db: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    real_valued: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(dists, relevance), each (b, n_db), for QUERY_BLOCK queries at a time."""
    if query.shape[0] != query_labels.shape[0] or db.shape[0] != db_labels.shape[0]:
        raise InputError(
            f"expected one label row per item, got {query.shape[0]} queries with "
            f"{query_labels.shape[0]} labels and {db.shape[0]} items with {db_labels.shape[0]}"
        )
    for start in range(0, query.shape[0], QUERY_BLOCK):
        block = slice(start, start + QUERY_BLOCK)
        rel = relevance(query_labels[block], db_labels)  # (b, n_db)
        if real_valued:
            yield cosine_distances(query[block], db), rel
        else:
            yield hamming_distances(query[block], db), rel


def map_all(
    query: np.ndarray,
    db: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    real_valued: bool,
    seed: int,
) -> float:
    """MAP@all of one direction, as score_direction gives it, without the curve."""
    blocks = _blocks(query, db, query_labels, db_labels, real_valued=real_valued)
    aps = [average_precisions(dists, rel, seed=seed) for dists, rel in blocks]
    return float(np.mean(np.concatenate(aps)))


def validation_map(
    model: Encoder,
    *,
    image: np.ndarray,
    text: np.ndarray,
    labels: np.ndarray,
    query_idx: np.ndarray,
    db_idx: np.ndarray,
    real_valued: bool = False,
    seed: int,
) -> tuple[float, float]:
    """(i2t, t2i) MAP@all of `model` with rows query_idx as queries against rows db_idx.

    What every choice on a held-out split is made on (AUCMH's epoch and k, the baselines'
    regulariser, the tuning script's settings).
    """
    ql, dl = labels[query_idx], labels[db_idx]
    i2t = map_all(
        model.encode_image(image[query_idx]), model.encode_text(text[db_idx]), ql, dl,
        real_valued=real_valued, seed=seed,
    )  # fmt: skip
    t2i = map_all(
        model.encode_text(text[query_idx]), model.encode_image(image[db_idx]), ql, dl,
        real_valued=real_valued, seed=seed,
    )  # fmt: skip
    return i2t, t2i


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
    n_db = db.shape[0]
    ks = np.unique(np.linspace(1, n_db, min(_CUTOFF_POINTS, n_db)).round().astype(np.int64))
    aps, precisions, recalls = [], [], []
    for dists, rel in _blocks(query, db, query_labels, db_labels, real_valued=real_valued):
        if real_valued:
            precision, recall = cutoff_curves(dists, rel, ks=ks, seed=seed)
        else:
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
