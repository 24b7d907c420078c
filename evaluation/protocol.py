"""The evaluation protocol: seeds, both retrieval directions, and what one run records.

Image-to-text (i2t) ranks the text codes of the database by their distance to an image query's
code; text-to-image (t2i) the other way round. Queries and database are disjoint, as the dataset's
protocol defines them; this module only scores the codes it is given.

What one direction reports (definitions in evaluation/metrics.py): MAP@all, the headline metric;
MAP@R; P@K and R@K for K in CUTOFFS, all against the database by shared labels; and instance-level
Recall@K for K in INSTANCE_CUTOFFS. For the last, the gallery is the other modality of the query
pairs themselves, as in the Flickr30K / MS-COCO test protocols (1,000 test images against their
own captions): an image query ranks the texts of all query pairs, and a hit is its own text in
the top K. It cannot be the database, because every protocol here keeps the query pairs out of
it, so a query's own partner is never there; a database with its partner added back would mix one
unseen item among training items. Every block of queries is ranked once for all of these.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from common.errors import InputError
from evaluation.metrics import (
    average_precisions,
    cosine_distances,
    hamming_distances,
    mean_curve,
    partner_ranks,
    radius_curves,
    ranked_scores,
    relevance,
)

METRIC = "map@all"  # the one MAP variant every table of this project reports
QUERY_BLOCK = 128  # queries scored at once: 128 x 200k database items is about 100 MB a matrix
_CUTOFF_POINTS = 64  # rank cut-offs along a real-valued method's precision-recall curve
CUTOFFS = (1, 10, 100)  # K of P@K and R@K against the database
INSTANCE_CUTOFFS = (1, 5, 10)  # K of instance-level Recall@K (the query's own pair)
WORDS_CUTOFF = 10  # K of the P@K reported for short queries
# How a database of codes is ranked for a query: "hamming" compares the query's code; "asymmetric"
# the query's real hash-layer output (tanh, L2-normalised, before the sign) by its inner product
# with each stored code (Gordo et al., TPAMI 2014): the database stays binary. Equal to ranking
# by the cosine, since every code has the same length sqrt(L).
SCORINGS = ("hamming", "asymmetric")


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
    """Every metric of one retrieval direction, each a mean over its queries, and the PR curve."""

    map_all: float
    curve: Curve
    map_r: float  # MAP@R, R = the query's relevant count in the database
    precision_at: dict[int, float]  # P@K for K in CUTOFFS
    recall_at: dict[int, float]  # R@K for K in CUTOFFS
    instance_recall_at: dict[int, float]  # own pair in the top K, for K in INSTANCE_CUTOFFS


@dataclass(frozen=True)
class WordsScore:
    """Short queries of W words (models/features/short_text.py) in one direction."""

    map_all: float
    map_r: float
    precision_at: float  # P@WORDS_CUTOFF
    queries: int  # the queries with at least one known word (the others have no query)


@dataclass(frozen=True)
class RunResult:
    """One method at one code length and seed, scored in both directions, ranked as `scoring`
    says; t2i_words / t2t_words: by W, short text queries against the image / text database."""

    method: str
    bits: int
    seed: int
    i2t: DirectionScore
    t2i: DirectionScore
    scoring: str = "hamming"
    t2i_words: dict[int, WordsScore] = field(default_factory=dict)
    t2t_words: dict[int, WordsScore] = field(default_factory=dict)


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


def score_words(
    query: np.ndarray,
    db: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    real_valued: bool,
    seed: int,
) -> WordsScore:
    """MAP@all, MAP@R and P@WORDS_CUTOFF of short queries (codes, or real outputs when
    `real_valued`) against a database, ranked as score_direction ranks."""
    ks = np.array([WORDS_CUTOFF], dtype=np.int64)
    ap, ap_r, p = [], [], []
    for dists, rel in _blocks(query, db, query_labels, db_labels, real_valued=real_valued):
        scores = ranked_scores(dists, rel, ks=ks, seed=seed)
        ap.append(scores.ap)
        ap_r.append(scores.ap_r)
        p.append(scores.precision[:, 0])
    if not ap:
        nan = float("nan")
        return WordsScore(map_all=nan, map_r=nan, precision_at=nan, queries=0)
    return WordsScore(
        map_all=float(np.mean(np.concatenate(ap))),
        map_r=float(np.mean(np.concatenate(ap_r))),
        precision_at=float(np.mean(np.concatenate(p))),
        queries=int(query.shape[0]),
    )


def score_direction(
    query: np.ndarray,
    db: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    partners: np.ndarray,
    real_valued: bool,
    seed: int,
) -> DirectionScore:
    """Score one direction: Hamming ranking for codes in {-1,+1}, cosine for real vectors.

    `partners` (n_query, width) are the other modality of the query pairs, row i paired with
    query i: the gallery of instance-level Recall@K (module docstring). Binary codes get the
    precision-recall curve over Hamming radius 0..L; real vectors have no radius, so theirs
    follows rank cut-offs K from 1 to the database size. Queries go in blocks, so memory stays at
    a block's (QUERY_BLOCK, n_db) matrices whatever the number of queries, and each block is
    ranked once for MAP@all, MAP@R, P@K, R@K and the real-valued curve.
    """
    if partners.shape[0] != query.shape[0]:
        raise InputError(
            f"expected one partner per query, got {partners.shape[0]} for {query.shape[0]} queries"
        )
    n_db = db.shape[0]
    curve_ks = np.unique(np.linspace(1, n_db, min(_CUTOFF_POINTS, n_db)).round().astype(np.int64))
    # One ranking serves the reported cut-offs and, for real vectors, the curve's cut-offs.
    extra = curve_ks if real_valued else np.zeros(0, dtype=np.int64)
    ks = np.concatenate([np.array(CUTOFFS, dtype=np.int64), extra])
    distances = cosine_distances if real_valued else hamming_distances
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("ap", "ap_r", "p", "r", "curve_p", "curve_r", "own")
    }
    start = 0
    for dists, rel in _blocks(query, db, query_labels, db_labels, real_valued=real_valued):
        scores = ranked_scores(dists, rel, ks=ks, seed=seed)
        if real_valued:
            precision, recall = (
                scores.precision[:, len(CUTOFFS) :],
                scores.recall[:, len(CUTOFFS) :],
            )
        else:
            precision, recall = radius_curves(dists, rel, n_bits=query.shape[1])
        block = slice(start, start + dists.shape[0])
        own = np.arange(dists.shape[0]) + start  # (b,) each query's own pair in the gallery
        parts["own"].append(partner_ranks(distances(query[block], partners), own, seed=seed))
        parts["ap"].append(scores.ap)
        parts["ap_r"].append(scores.ap_r)
        parts["p"].append(scores.precision[:, : len(CUTOFFS)])
        parts["r"].append(scores.recall[:, : len(CUTOFFS)])
        parts["curve_p"].append(precision)
        parts["curve_r"].append(recall)
        start += dists.shape[0]
    mean_precision, mean_recall = mean_curve(
        np.vstack(parts["curve_p"]), np.vstack(parts["curve_r"])
    )
    curve = Curve(
        precision=mean_precision,
        recall=mean_recall,
        by="rank" if real_valued else "hamming radius",
    )
    p_at = np.vstack(parts["p"]).mean(axis=0)
    r_at = np.vstack(parts["r"]).mean(axis=0)
    own_ranks = np.concatenate(parts["own"])
    return DirectionScore(
        map_all=float(np.mean(np.concatenate(parts["ap"]))),
        curve=curve,
        map_r=float(np.mean(np.concatenate(parts["ap_r"]))),
        precision_at={k: float(v) for k, v in zip(CUTOFFS, p_at, strict=True)},
        recall_at={k: float(v) for k, v in zip(CUTOFFS, r_at, strict=True)},
        instance_recall_at={k: float(np.mean(own_ranks <= k)) for k in INSTANCE_CUTOFFS},
    )


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
    scoring: str = "hamming",
    image_partners: np.ndarray | None = None,
    text_partners: np.ndarray | None = None,
) -> RunResult:
    """Score a method's query and database encodings in both directions (ties seeded by `seed`);
    each direction's instance gallery is the other modality's query pairs, encoded as the
    database is (`*_partners`; the query encodings themselves when None).

    With scoring "asymmetric" the queries are real hash-layer outputs and the database codes,
    ranked by cosine (SCORINGS); a real-valued method is ranked by cosine whatever `scoring`.
    """
    if scoring not in SCORINGS:
        raise InputError(f"expected a scoring in {', '.join(SCORINGS)}, got {scoring!r}")
    by_cosine = real_valued or scoring == "asymmetric"
    i2t = score_direction(
        image_query, text_db, query_labels, db_labels,
        partners=text_query if text_partners is None else text_partners,
        real_valued=by_cosine, seed=seed,
    )  # fmt: skip
    t2i = score_direction(
        text_query, image_db, query_labels, db_labels,
        partners=image_query if image_partners is None else image_partners,
        real_valued=by_cosine, seed=seed,
    )  # fmt: skip
    return RunResult(method=method, bits=bits, seed=seed, i2t=i2t, t2i=t2i, scoring=scoring)
