"""The methods `cmh evaluate` compares, and the loop that fits, encodes and scores them.

Each method fits on the training rows of a PairDataset (features only) and encodes the query and
database rows of both modalities. Binary methods are ranked by Hamming distance; the real-valued
CCA reference by cosine, with one fit serving every code length. Every method makes its choices
by validation MAP@all (mean of both directions) on a seeded split held out of the training part,
never on the queries, but the splits differ, and the difference favours the baselines:
- AUCMH (models/training/train.py) holds out TrainConfig.n_val pairs (2,000, at most a fifth),
  ranks them against at most VAL_DATABASE_CAP (20,000) of the other training pairs, picks the
  epoch and then the anchor k on them, and keeps that model: it never trains on the held-out pairs.
- each baseline holds out VALIDATION_FRACTION (a fifth) of the training part, ranks it against
  all the other training pairs, picks its one regularisation value (widening its grid while the
  choice sits on an edge), and then refits on the whole training part.
Those baseline fits share their covariances and CCA directions through one FitCache per
evaluate_methods call (models/methods/baselines.py); the fits are bit-identical without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from common.errors import InputError
from evaluation.protocol import Encoder, RunResult, score_run, validation_map, validation_split
from models.data.dataset import PairDataset
from models.features.pipeline import DEFAULT_VOCAB_SIZE, retokenize, reweight
from models.features.text import DEFAULT_TOKENS
from models.methods.baselines import CCA, CCAITQ, CMFH, CVH, LSH, FitCache
from models.training.train import TrainConfig, train_selecting, with_k_grid

logger = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.2  # of the training part, held out to choose each baseline's regulariser
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # CCA covariance ridge, relative to the mean eigenvalue
GAMMA_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # CMFH's ridge gamma (the paper's 0.01 first)
# A choice on a grid's edge says the best value may lie beyond it: the grid grows by its own
# ratio past that edge, at most this many values, until the choice is inside (issue 17: CCA-ITQ
# and CCA chose 10, the edge, on Web News at 64 bits).
MAX_GRID_EXTENSIONS = 4


class Fit(Protocol):
    """Fit a method on a dataset's training part at (n_bits, seed); a cache may share work, and
    a method that trains several candidates may train up to `processes` of them at once."""

    def __call__(
        self,
        data: PairDataset,
        n_bits: int,
        seed: int,
        /,
        cache: FitCache | None = None,
        processes: int = 1,
    ) -> Encoder: ...


@dataclass(frozen=True)
class Method:
    """A method's name, its fit (data, n_bits, seed) -> Encoder, and how its outputs rank."""

    name: str
    fit: Fit
    real_valued: bool = False  # cosine ranking; one fit per seed serves every n_bits
    text_weighting: str = "binary"  # the text features it is fitted and scored on
    text_tokens: str = DEFAULT_TOKENS  # how their Chinese words are cut (TOKENIZATIONS)


class _CCAEncoder:
    """Real-valued CCA behind the Encoder shape: its 'codes' are shared-space embeddings."""

    def __init__(self, cca: CCA) -> None:
        self._cca = cca

    def encode_image(self, features: np.ndarray) -> np.ndarray:
        """Image embeddings (n, c) float64."""
        return self._cca.embed_image(features)

    def encode_text(self, features: np.ndarray) -> np.ndarray:
        """Text embeddings (n, c) float64."""
        return self._cca.embed_text(features)


def features(data: PairDataset) -> tuple[np.ndarray, np.ndarray]:
    """All rows' (image, text) features; raises InputError when the dataset has none."""
    if data.image_features is None or data.text_features is None:
        raise InputError(f"expected image and text features in dataset {data.name!r}, got none")
    return data.image_features, data.text_features


# A baseline fitted on (image, text) rows at (n_bits, seed) with one regularisation value.
FitOne = Callable[[np.ndarray, np.ndarray, int, int, float, FitCache | None], Encoder]


def _binary(make: Callable[[float], CVH | LSH | CCAITQ | CMFH]) -> FitOne:
    """The FitOne of a binary baseline built by make(regularisation value)."""

    def fit_one(
        image: np.ndarray,
        text: np.ndarray,
        n_bits: int,
        seed: int,
        value: float,
        cache: FitCache | None,
    ) -> Encoder:
        return make(value).fit(image, text, n_bits=n_bits, seed=seed, cache=cache)

    return fit_one


def _cca(
    image: np.ndarray,
    text: np.ndarray,
    _n_bits: int,
    _seed: int,
    ridge: float,
    cache: FitCache | None,
) -> Encoder:
    return _CCAEncoder(CCA(ridge=ridge).fit(image, text, cache=cache))


def choose_widening(
    score: Callable[[float], float],
    grid: Sequence[float],
    *,
    max_extensions: int = MAX_GRID_EXTENSIONS,
) -> tuple[float, list[tuple[float, float]]]:
    """The value of best score on a geometric grid, widened while the choice sits on an edge.

    Past the edge the grid goes on by its ratio there (grid[1] / grid[0] below, the last two
    values' above), one value at a time, at most `max_extensions` values in all. The first best
    wins ties. Returns (best value, every (value, score) tried in ascending value order).
    """
    if len(grid) < 2 or any(b <= a for a, b in zip(grid[:-1], grid[1:], strict=False)):
        raise InputError(f"expected an ascending grid of at least 2 values, got {list(grid)}")
    tried = [(v, score(v)) for v in grid]
    for _ in range(max_extensions):
        best = int(np.argmax([s for _, s in tried]))
        if best == 0:
            value = tried[0][0] * tried[0][0] / tried[1][0]
            tried.insert(0, (value, score(value)))
        elif best == len(tried) - 1:
            value = tried[-1][0] * tried[-1][0] / tried[-2][0]
            tried.append((value, score(value)))
        else:
            break
    best_value = tried[int(np.argmax([s for _, s in tried]))][0]
    return best_value, tried


def _tuned(fit_one: FitOne, grid: Sequence[float], *, real_valued: bool = False) -> Fit:
    """Fit with the grid value of best validation MAP (mean of both directions), then refit.

    The validation split is held out of the training part (seeded by the run's seed); the
    queries are never looked at. A choice on the grid's edge widens the grid (choose_widening).
    """

    def fit(
        data: PairDataset,
        n_bits: int,
        seed: int,
        /,
        cache: FitCache | None = None,
        processes: int = 1,
    ) -> Encoder:
        del processes  # closed-form fits, cheap next to AUCMH's training: run here
        image, text = features(data)
        fit_idx, val_idx = validation_split(data.train_idx, fraction=VALIDATION_FRACTION, seed=seed)

        def score(value: float) -> float:
            model = fit_one(image[fit_idx], text[fit_idx], n_bits, seed, value, cache)
            i2t, t2i = validation_map(
                model, image=image, text=text, labels=data.labels, query_idx=val_idx,
                db_idx=fit_idx, real_valued=real_valued, seed=seed,
            )  # fmt: skip
            return (i2t + t2i) / 2

        best, tried = choose_widening(score, grid)
        logger.info(
            "validation MAP@all by regularisation %s: chose %g",
            ", ".join(f"{v:g}: {m:.4f}" for v, m in tried),
            best,
        )
        if best in (tried[0][0], tried[-1][0]):
            logger.warning("regulariser %g is still on the edge of the widened grid", best)
        return fit_one(image[data.train_idx], text[data.train_idx], n_bits, seed, best, cache)

    return fit


def _aucmh(**fields: Any) -> Fit:
    """AUCMH with TrainConfig's defaults but `fields` (ablation switches, options), per length.

    One model per k in K_GRID; the trainer picks the epoch, and then the k, by validation MAP on
    a split held out of the training part.
    """
    TrainConfig(**fields)  # a bad field fails when the table is built, not in the middle of a run

    def fit(
        data: PairDataset,
        n_bits: int,
        seed: int,
        /,
        cache: FitCache | None = None,
        processes: int = 1,
    ) -> Encoder:
        del cache  # gradient training: no closed-form step repeats between fits
        cfg = replace(TrainConfig(), n_bits=n_bits, seed=seed, **fields)
        model, _history, _chosen = train_selecting(
            candidates=with_k_grid(cfg), data=data, processes=processes
        )
        return model

    return fit


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        # The paper's method with this project's validated defaults: the reference row.
        Method("aucmh", _aucmh()),
        # The paper's ablations (its Table 5).
        Method("aucmh-no-lr", _aucmh(use_ranking_loss=False)),
        Method("aucmh-no-lg", _aucmh(use_graph_loss=False)),
        Method("aucmh-no-hash", _aucmh(use_hash_layer=False)),
        # Options beyond the paper, one row each (scripts/quality_study.py measures them).
        Method("aucmh-cosine", _aucmh(lr_schedule="cosine")),
        Method("aucmh-hash-t2", _aucmh(hash_temperature=2.0)),
        Method("aucmh-tfidf", _aucmh(), text_weighting="tfidf"),  # needs raw texts (Web News)
        # tf-idf over jieba's search-mode words (vocabulary refitted on the training texts).
        Method("aucmh-tfidf-search", _aucmh(), text_weighting="tfidf", text_tokens="search"),
        # The same, with P leaning on the text graph (w 0.8, chosen on Web News' validation split).
        Method(
            "aucmh-tfidf-search-graph-text-0.8",
            _aucmh(graph_text_weight=0.8),
            text_weighting="tfidf",
            text_tokens="search",
        ),
        Method("cvh", _tuned(_binary(lambda ridge: CVH(ridge=ridge)), RIDGE_GRID)),
        Method("cmfh", _tuned(_binary(lambda gamma: CMFH(gamma=gamma)), GAMMA_GRID)),
        Method("cca-itq", _tuned(_binary(lambda ridge: CCAITQ(ridge=ridge)), RIDGE_GRID)),
        Method("lsh", _tuned(_binary(lambda ridge: LSH(ridge=ridge)), RIDGE_GRID)),
        Method("cca", _tuned(_cca, RIDGE_GRID, real_valued=True), real_valued=True),
    )
}


def parse_methods(text: str) -> list[Method]:
    """Methods from a comma-separated list of names; raises InputError for an unknown name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise InputError(f"expected methods from {', '.join(METHODS)}, got {text!r}")
    return [METHODS[n] for n in dict.fromkeys(names)]


def evaluate_methods(
    data: PairDataset,
    *,
    methods: Sequence[Method],
    bits: Sequence[int],
    seeds: Sequence[int],
    train_processes: int = 1,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> list[RunResult]:
    """Fit, encode and score every method at every code length and seed (one result each);
    AUCMH trains up to `train_processes` of its k candidates at once (the same models). A
    method cutting text otherwise than data refits a vocabulary of at most `vocab_size` words."""
    if data.query_idx.size == 0:
        raise InputError('expected query pairs (split "query") to evaluate, got none')
    q, db = data.query_idx, data.database_idx
    cache = FitCache()  # content-keyed, so sharing it across methods and seeds is safe
    # (weighting, tokens) -> the text features; vocabulary and idf from the training part only.
    weighted: dict[tuple[str, str], PairDataset] = {("binary", data.text_tokens): data}
    results: list[RunResult] = []
    for method in methods:
        inputs = (method.text_weighting, method.text_tokens)
        if inputs not in weighted:
            cut = weighted.get(("binary", method.text_tokens))
            if cut is None:
                cut = retokenize(data, method.text_tokens, vocab_size=vocab_size)
                weighted["binary", method.text_tokens] = cut
            weighted[inputs] = reweight(cut, method.text_weighting)
        mdata = weighted[inputs]
        image, text = features(mdata)
        for seed in seeds:
            # A real-valued method ignores n_bits: fit and score it once, repeat for each length.
            lengths = bits[:1] if method.real_valued else bits
            for n_bits in lengths:
                start = time.perf_counter()
                model = method.fit(mdata, n_bits, seed, cache=cache, processes=train_processes)
                run = score_run(
                    method=method.name,
                    bits=n_bits,
                    seed=seed,
                    image_query=model.encode_image(image[q]),
                    text_query=model.encode_text(text[q]),
                    image_db=model.encode_image(image[db]),
                    text_db=model.encode_text(text[db]),
                    query_labels=mdata.labels[q],
                    db_labels=mdata.labels[db],
                    real_valued=method.real_valued,
                )
                logger.info(
                    "%s %d bits seed %d: MAP@all i2t %.4f t2i %.4f (%.1f s)",
                    method.name,
                    n_bits,
                    seed,
                    run.i2t.map_all,
                    run.t2i.map_all,
                    time.perf_counter() - start,
                )
                if method.real_valued:
                    results.extend(_with_bits(run, b) for b in bits)
                else:
                    results.append(run)
    logger.info("baseline fit cache: %d hits, %d computed", cache.hits, cache.misses)
    return results


def _with_bits(run: RunResult, n_bits: int) -> RunResult:
    return RunResult(method=run.method, bits=n_bits, seed=run.seed, i2t=run.i2t, t2i=run.t2i)
