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

Over 400 lines because the method table, the evaluation loop and the short queries it scores are
one comparison; the baselines live in models/methods/baselines.py, the metrics in evaluation/.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from common.errors import InputError
from evaluation.protocol import (
    SCORINGS,
    Encoder,
    RunResult,
    WordsScore,
    score_run,
    score_words,
    seeded_split,
    validation_map,
    validation_split,
)
from models.data.dataset import PairDataset
from models.features.pipeline import DEFAULT_VOCAB_SIZE, retokenize, reweight, text_vectorizer
from models.features.short_text import draw_words, query_words_rng
from models.features.text import DEFAULT_TOKENS
from models.methods.baselines import CCA, CCAITQ, CMFH, CVH, LSH, FitCache
from models.methods.trained import Trained
from models.training.train import (
    K_GRID,
    TrainConfig,
    best_validation_map,
    train_selecting,
    with_k_grid,
)

logger = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.2  # of the training part, held out to choose each baseline's regulariser
# `cmh evaluate --on validation`: queries are this fraction of the training part, held out by a
# permutation seeded with VALIDATION_QUERY_SEED (not any run's seed: every run meets the same).
VALIDATION_QUERIES = 0.2
VALIDATION_QUERY_SEED = 1000
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
    # The TrainConfig fields an AUCMH row sets over the defaults (`cmh train --method` trains
    # exactly this); None for a baseline, which `cmh train` does not train.
    train_options: dict[str, Any] | None = None
    # A choosing row: the AUCMH rows it trains, keeping the best on validation (train_row).
    candidates: tuple[str, ...] = ()


def text_inputs(method: Method, *, raw_texts: bool) -> tuple[str, str]:
    """(weighting, tokens) of the text `method` is fitted on: its own where the dataset has raw
    texts; where it ships text features (Wikipedia's LDA topics) they cannot be weighted or cut,
    so the row trains on them as given, as binary, and only its other options apply."""
    if raw_texts:
        return method.text_weighting, method.text_tokens
    return "binary", DEFAULT_TOKENS


class RealOutputs(Protocol):
    """An encoder whose codes are signs of real outputs it can also give (asymmetric scoring)."""

    def embed_image(self, features: np.ndarray) -> np.ndarray: ...

    def embed_text(self, features: np.ndarray) -> np.ndarray: ...


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


def aucmh(
    name: str, *, text_weighting: str = "binary", text_tokens: str = DEFAULT_TOKENS, **options: Any
) -> Method:
    """An AUCMH row: TrainConfig's defaults but `options`, on text weighted and cut as named."""
    return Method(
        name,
        _aucmh(**options),
        text_weighting=text_weighting,
        text_tokens=text_tokens,
        train_options=options,
    )


# Short text views and the short-query validation criterion (issue 32; TrainConfig fields).
_SHORT: dict[str, Any] = {"short_view_weight": 1.0, "short_view_words": 3}
_SHORT_VAL: dict[str, Any] = {**_SHORT, "val_short_words": 3}
_BEST: dict[str, Any] = {
    "text_weighting": "tfidf",
    "text_tokens": "search",
    "graph_text_weight": 0.8,
}


def _choosing_fit(
    data: PairDataset,
    n_bits: int,
    seed: int,
    /,
    cache: FitCache | None = None,
    processes: int = 1,
) -> Encoder:
    """A choosing row is trained by train_row (evaluate_methods calls it): its candidates' text
    differs, so the fit alone could not say which features the model reads."""
    del data, n_bits, seed, cache, processes
    raise InputError("expected a choosing row to be trained by train_row")


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        # The paper's method with this project's validated defaults: the reference row.
        aucmh("aucmh"),
        # The paper's ablations (its Table 5).
        aucmh("aucmh-no-lr", use_ranking_loss=False),
        aucmh("aucmh-no-lg", use_graph_loss=False),
        aucmh("aucmh-no-hash", use_hash_layer=False),
        # Options beyond the paper, one row each (scripts/quality_study.py measures them).
        aucmh("aucmh-cosine", lr_schedule="cosine"),
        aucmh("aucmh-hash-t2", hash_temperature=2.0),
        aucmh("aucmh-tfidf", text_weighting="tfidf"),  # needs raw texts (Web News)
        # tf-idf over jieba's search-mode words (vocabulary refitted on the training texts).
        aucmh("aucmh-tfidf-search", text_weighting="tfidf", text_tokens="search"),
        # The same, with P leaning on the text graph (w 0.8, chosen on Web News' validation split).
        aucmh("aucmh-tfidf-search-graph-text-0.8", **_BEST),
        # Short text views of 1-3 words beside each caption in training (weight 1), without and
        # with the short-query validation criterion; on the paper's row and on the best row.
        aucmh("aucmh-short-views", **_SHORT),
        aucmh("aucmh-short-views-val", **_SHORT_VAL),
        aucmh("aucmh-tfidf-search-graph-text-0.8-short-views", **_BEST, **_SHORT),
        aucmh("aucmh-tfidf-search-graph-text-0.8-short-views-val", **_BEST, **_SHORT_VAL),
        # Chooses on the collection's own validation split between the paper's row and the row
        # that reads short queries best on Web News (issue 32; docs/keyword-queries.md).
        Method(
            "aucmh-auto",
            _choosing_fit,
            train_options={},
            candidates=("aucmh", "aucmh-tfidf-search-graph-text-0.8-short-views"),
        ),
        aucmh(
            "aucmh-tfidf-search-graph-text-0.8-short-views-2",
            **_BEST,
            **{**_SHORT, "short_view_weight": 2.0},
        ),
        Method("cvh", _tuned(_binary(lambda ridge: CVH(ridge=ridge)), RIDGE_GRID)),
        Method("cmfh", _tuned(_binary(lambda gamma: CMFH(gamma=gamma)), GAMMA_GRID)),
        Method("cca-itq", _tuned(_binary(lambda ridge: CCAITQ(ridge=ridge)), RIDGE_GRID)),
        Method("lsh", _tuned(_binary(lambda ridge: LSH(ridge=ridge)), RIDGE_GRID)),
        Method("cca", _tuned(_cca, RIDGE_GRID, real_valued=True), real_valued=True),
    )
}


# What `cmh train` and the demo build train when no method is named, and what `--methods default`
# evaluates: the row that validated best on Web News' validation split (docs/keyword-queries.md).
DEFAULT_METHOD = "aucmh-auto"


def parse_methods(text: str) -> list[Method]:
    """Methods from a comma-separated list of names ("default": DEFAULT_METHOD); raises
    InputError for an unknown name."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    names = [DEFAULT_METHOD if n == "default" else n for n in names]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise InputError(f"expected methods from default, {', '.join(METHODS)}, got {text!r}")
    return [METHODS[n] for n in dict.fromkeys(names)]


def on_validation(data: PairDataset) -> PairDataset:
    """data with its queries replaced by VALIDATION_QUERIES of its training part (seeded by
    VALIDATION_QUERY_SEED), ranked against the rest, which is also all that trains: choices are
    made on these figures, and the dataset's own queries are never read."""
    n_held = int(round(VALIDATION_QUERIES * data.train_idx.size))
    if not 0 < n_held < data.train_idx.size:
        raise InputError(
            f"expected enough training pairs to hold out validation queries, got "
            f"{data.train_idx.size}"
        )
    kept, held = seeded_split(data.train_idx, n_held=n_held, seed=VALIDATION_QUERY_SEED)
    protocol = (
        f"validation: {held.size} of the {data.train_idx.size} training pairs as queries "
        f"(seed {VALIDATION_QUERY_SEED}) against the other {kept.size}, which train"
    )
    return replace(data, train_idx=kept, query_idx=held, database_idx=kept, protocol=protocol)


def short_queries(data: PairDataset, n_words: int) -> tuple[np.ndarray, np.ndarray]:
    """(features, rows): the query captions of `data` cut to n_words of their known words
    (models/features/short_text.py), weighted as data's text features are and as the service
    weights a typed query (each word once), for the query rows `rows` that know a word."""
    vectorizer = text_vectorizer(data, data.text_weighting)
    assert data.texts is not None  # text_vectorizer checked
    columns = vectorizer.columns([data.texts[i] for i in data.query_idx])
    chosen = draw_words(columns, n_words, query_words_rng(n_words))
    known = np.array([c.size > 0 for c in chosen], dtype=bool)
    kept = [c for c, k in zip(chosen, known, strict=True) if k]
    values = [vectorizer.values_of(c, np.ones(c.size, dtype=np.int64)) for c in kept]
    return vectorizer.dense(kept, values), data.query_idx[known]


def has_raw_texts(data: PairDataset) -> bool:
    """Whether short queries can be cut from data's captions (a vocabulary and the raw texts)."""
    return data.texts is not None and data.vocabulary is not None


def _words_scores(
    model: Encoder,
    data: PairDataset,
    query_words: Sequence[int],
    *,
    image_db: np.ndarray,
    text_db: np.ndarray,
    asymmetric: bool,
    real_valued: bool,
    seed: int,
) -> tuple[dict[int, WordsScore], dict[int, WordsScore]]:
    """(t2i_words, t2t_words) of `model` for each W in query_words."""
    t2i: dict[int, WordsScore] = {}
    t2t: dict[int, WordsScore] = {}
    db_labels = data.labels[data.database_idx]
    for n_words in query_words:
        features, rows = short_queries(data, n_words)
        if asymmetric:
            query = cast_real(model).embed_text(features)
        else:
            query = model.encode_text(features)
        by_cosine = asymmetric or real_valued
        labels = data.labels[rows]
        t2i[n_words] = score_words(
            query, image_db, labels, db_labels, real_valued=by_cosine, seed=seed
        )
        t2t[n_words] = score_words(
            query, text_db, labels, db_labels, real_valued=by_cosine, seed=seed
        )
    return t2i, t2t


def cast_real(model: Encoder) -> RealOutputs:
    """model as RealOutputs; raises InputError when it has no real output before its signs."""
    if not (hasattr(model, "embed_image") and hasattr(model, "embed_text")):
        raise InputError(f"expected a model with real outputs, got {type(model).__name__}")
    return model  # type: ignore[return-value]


def evaluate_methods(
    data: PairDataset,
    *,
    methods: Sequence[Method],
    bits: Sequence[int],
    seeds: Sequence[int],
    train_processes: int = 1,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    scorings: Sequence[str] = ("hamming",),
    query_words: Sequence[int] = (),
) -> list[RunResult]:
    """Fit, encode and score every method at every code length and seed (one result per
    scoring); AUCMH trains up to `train_processes` of its k candidates at once (the same
    models). A method cutting text otherwise than data refits a vocabulary of at most
    `vocab_size` words. `query_words` adds short text queries of each W words (t2i_words,
    t2t_words) where data has raw texts. "asymmetric" scores methods with real outputs (AUCMH);
    the others are scored by Hamming only (logged), and a real-valued one (CCA) by cosine."""
    if data.query_idx.size == 0:
        raise InputError('expected query pairs (split "query") to evaluate, got none')
    unknown = [s for s in scorings if s not in SCORINGS]
    if not scorings or unknown:
        raise InputError(f"expected scorings from {', '.join(SCORINGS)}, got {list(scorings)}")
    if query_words and not has_raw_texts(data):
        logger.warning(
            "%s has text features but no raw texts: no short-query figures (--query-words)",
            data.name,
        )
        query_words = ()
    cache = FitCache()  # content-keyed, so sharing it across methods and seeds is safe
    # (weighting, tokens) -> the text features; vocabulary and idf from the training part only.
    weighted: dict[tuple[str, str], PairDataset] = {("binary", data.text_tokens): data}
    results: list[RunResult] = []
    for method in methods:
        if method.candidates:
            results.extend(
                _evaluate_choosing(
                    data,
                    method,
                    bits=bits,
                    seeds=seeds,
                    processes=train_processes,
                    vocab_size=vocab_size,
                    scorings=scorings,
                    query_words=query_words,
                )  # fmt: skip
            )
            continue
        inputs = text_inputs(method, raw_texts=data.texts is not None)
        if inputs != (method.text_weighting, method.text_tokens):
            logger.info(
                "%s: %s ships text features, fitted on them as given", method.name, data.name
            )
        if inputs not in weighted:
            weighting, tokens = inputs
            cut = weighted.get(("binary", tokens))
            if cut is None:
                cut = retokenize(data, tokens, vocab_size=vocab_size)
                weighted["binary", tokens] = cut
            weighted[inputs] = reweight(cut, weighting)
        mdata = weighted[inputs]
        features(mdata)  # both modalities' features, or an InputError before any fit
        for seed in seeds:
            # A real-valued method ignores n_bits: fit and score it once, repeat for each length.
            lengths = bits[:1] if method.real_valued else bits
            for n_bits in lengths:
                start = time.perf_counter()
                model = method.fit(mdata, n_bits, seed, cache=cache, processes=train_processes)
                runs = _score_model(
                    model, mdata, method, n_bits=n_bits, seed=seed, scorings=scorings,
                    query_words=query_words, start=start,
                )  # fmt: skip
                for run in runs:
                    if method.real_valued:
                        results.extend(_with_bits(run, b) for b in bits)
                    else:
                        results.append(run)
    logger.info("baseline fit cache: %d hits, %d computed", cache.hits, cache.misses)
    return results


def _score_model(
    model: Encoder,
    mdata: PairDataset,
    method: Method,
    *,
    n_bits: int,
    seed: int,
    scorings: Sequence[str],
    query_words: Sequence[int],
    start: float,
) -> list[RunResult]:
    """One result per scoring of a fitted model on mdata's queries and database."""
    image, text = features(mdata)
    q, db = mdata.query_idx, mdata.database_idx
    image_db = model.encode_image(image[db])
    text_db = model.encode_text(text[db])
    image_codes = model.encode_image(image[q])
    text_codes = model.encode_text(text[q])
    runs = []
    for scoring in scorings:
        asymmetric = scoring == "asymmetric" and not method.real_valued
        if asymmetric and not hasattr(model, "embed_text"):
            logger.info("%s has no real outputs: scored by Hamming only", method.name)
            continue
        real = cast_real(model) if asymmetric else None
        run = score_run(
            method=method.name,
            bits=n_bits,
            seed=seed,
            image_query=image_codes if real is None else real.embed_image(image[q]),
            text_query=text_codes if real is None else real.embed_text(text[q]),
            image_db=image_db,
            text_db=text_db,
            query_labels=mdata.labels[q],
            db_labels=mdata.labels[db],
            real_valued=method.real_valued,
            scoring=scoring,
            image_partners=image_codes,
            text_partners=text_codes,
        )
        t2i_words, t2t_words = _words_scores(
            model, mdata, query_words, image_db=image_db, text_db=text_db,
            asymmetric=asymmetric, real_valued=method.real_valued, seed=seed,
        )  # fmt: skip
        run = replace(run, t2i_words=t2i_words, t2t_words=t2t_words)
        logger.info(
            "%s %d bits seed %d %s: MAP@all i2t %.4f t2i %.4f%s (%.1f s)",
            method.name, n_bits, seed, scoring, run.i2t.map_all, run.t2i.map_all,
            "".join(f", t2i {w} words {v.map_all:.4f}" for w, v in t2i_words.items()),
            time.perf_counter() - start,
        )  # fmt: skip
        runs.append(run)
    return runs


def _evaluate_choosing(
    data: PairDataset,
    method: Method,
    *,
    bits: Sequence[int],
    seeds: Sequence[int],
    processes: int,
    vocab_size: int,
    scorings: Sequence[str],
    query_words: Sequence[int],
) -> list[RunResult]:
    """A choosing row's results: per length and seed, the candidate train_row keeps, scored."""
    results = []
    for seed in seeds:
        for n_bits in bits:
            start = time.perf_counter()
            trained = train_row(
                data, method, overrides={"n_bits": n_bits, "seed": seed}, processes=processes,
                vocab_size=vocab_size,
            )  # fmt: skip
            logger.info("%s %d bits seed %d chose %s", method.name, n_bits, seed, trained.method)
            results.extend(
                _score_model(
                    trained.model,
                    trained.data,
                    method,
                    n_bits=n_bits,
                    seed=seed,
                    scorings=scorings,
                    query_words=query_words,
                    start=start,
                )  # fmt: skip
            )
    return results


# What a choosing row's candidates compete on (TrainConfig.val_short_words): validation whole
# captions in both directions and captions cut to 1..3 words, the words people type.
CHOICE_SHORT_WORDS = 3


def train_row(
    data: PairDataset,
    method: Method,
    *,
    overrides: dict[str, Any] | None = None,
    ks: Sequence[int] = K_GRID,
    processes: int = 1,
    progress: bool = False,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    text: tuple[str | None, str | None] = (None, None),
) -> Trained:
    """Train an AUCMH row on `data` (binary words as prepared; the row's text is cut and weighted
    from its raw captions), one model per k, and keep the best on validation. A choosing row
    trains each of its candidates so, all judged with val_short_words CHOICE_SHORT_WORDS, and
    keeps the one of best validation score. `overrides` (TrainConfig fields) and `text`
    ((weighting, tokens), None: the row's) apply to every candidate."""
    rows = [METHODS[name] for name in method.candidates] or [method]
    choosing = len(rows) > 1
    best: Trained | None = None
    for row in rows:
        if row.train_options is None:
            raise InputError(f"expected an AUCMH row to train, got {row.name!r}")
        weighting, tokens = text_inputs(row, raw_texts=data.texts is not None)
        weighting, tokens = text[0] or weighting, text[1] or tokens
        rdata = (
            data if tokens == data.text_tokens else retokenize(data, tokens, vocab_size=vocab_size)
        )
        if weighting != rdata.text_weighting:
            rdata = reweight(rdata, weighting)
        options = {**row.train_options, **(overrides or {})}
        if choosing:
            options["val_short_words"] = CHOICE_SHORT_WORDS
        candidates = with_k_grid(TrainConfig(**options), ks)
        model, history, cfg = train_selecting(
            candidates=candidates, data=rdata, progress=progress, processes=processes
        )
        trained = Trained(
            method=row.name, model=model, history=history, config=cfg, data=rdata,
            score=best_validation_map(history),
        )  # fmt: skip
        if choosing:
            logger.info(
                "%s: candidate %s validation score %.4f", method.name, row.name, trained.score
            )
        if best is None or trained.score > best.score:
            best = trained
    assert best is not None
    return best


def _with_bits(run: RunResult, n_bits: int) -> RunResult:
    return replace(run, bits=n_bits)
