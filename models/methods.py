"""The methods `cmh evaluate` compares, and the loop that fits, encodes and scores them.

Each method fits on the training rows of a PairDataset (features only; labels are never seen) and
encodes the query and database rows of both modalities. Binary methods are ranked by Hamming
distance; the real-valued CCA reference by cosine, with one fit serving every code length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from common.errors import InputError
from evaluation.protocol import RunResult, score_run
from models.baselines import CCA, CCAITQ, CMFH, CVH, LSH
from models.data import PairDataset

logger = logging.getLogger(__name__)


class Encoder(Protocol):
    """Anything fitted that maps image and text features to codes (or real embeddings)."""

    def encode_image(self, features: np.ndarray) -> np.ndarray: ...

    def encode_text(self, features: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Method:
    """A method's name, its fit (data, n_bits, seed) -> Encoder, and how its outputs rank."""

    name: str
    fit: Callable[[PairDataset, int, int], Encoder]
    real_valued: bool = False  # cosine ranking; fitted once, its scores repeat for every n_bits


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


def train_features(data: PairDataset) -> tuple[np.ndarray, np.ndarray]:
    """The training rows' (image, text) features; raises InputError when features are missing."""
    if data.image_features is None or data.text_features is None:
        raise InputError(f"expected image and text features in dataset {data.name!r}, got none")
    return data.image_features[data.train_idx], data.text_features[data.train_idx]


def _fit_cvh(data: PairDataset, n_bits: int, seed: int) -> Encoder:
    return CVH().fit(*train_features(data), n_bits=n_bits, seed=seed)


def _fit_lsh(data: PairDataset, n_bits: int, seed: int) -> Encoder:
    return LSH().fit(*train_features(data), n_bits=n_bits, seed=seed)


def _fit_cca_itq(data: PairDataset, n_bits: int, seed: int) -> Encoder:
    return CCAITQ().fit(*train_features(data), n_bits=n_bits, seed=seed)


def _fit_cmfh(data: PairDataset, n_bits: int, seed: int) -> Encoder:
    return CMFH().fit(*train_features(data), n_bits=n_bits, seed=seed)


def _fit_cca(data: PairDataset, _n_bits: int, _seed: int) -> Encoder:
    return _CCAEncoder(CCA().fit(*train_features(data)))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("cvh", _fit_cvh),
        Method("cmfh", _fit_cmfh),
        Method("cca-itq", _fit_cca_itq),
        Method("lsh", _fit_lsh),
        Method("cca", _fit_cca, real_valued=True),
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
    data: PairDataset, *, methods: Sequence[Method], bits: Sequence[int], seeds: Sequence[int]
) -> list[RunResult]:
    """Fit, encode and score every method at every code length and seed (one result each)."""
    if data.image_features is None or data.text_features is None:
        raise InputError(f"expected image and text features in dataset {data.name!r}, got none")
    image, text = data.image_features, data.text_features
    q, db = data.query_idx, data.database_idx
    results: list[RunResult] = []
    for method in methods:
        for seed in seeds:
            # A real-valued method ignores n_bits: fit and score it once, repeat for each length.
            lengths = bits[:1] if method.real_valued else bits
            for n_bits in lengths:
                start = time.perf_counter()
                model = method.fit(data, n_bits, seed)
                run = score_run(
                    method=method.name,
                    bits=n_bits,
                    seed=seed,
                    image_query=model.encode_image(image[q]),
                    text_query=model.encode_text(text[q]),
                    image_db=model.encode_image(image[db]),
                    text_db=model.encode_text(text[db]),
                    query_labels=data.labels[q],
                    db_labels=data.labels[db],
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
    return results


def _with_bits(run: RunResult, n_bits: int) -> RunResult:
    return RunResult(method=run.method, bits=n_bits, seed=run.seed, i2t=run.i2t, t2i=run.t2i)
