"""Short texts cut from whole ones: what people type, drawn from a caption's own words.

People search with one to three words; every dataset pairs an image with a whole caption. Two
uses of the same draw:
- evaluation (`cmh evaluate --query-words`) cuts each query caption to W of its distinct known
  words, drawn without replacement by a generator seeded with (QUERY_WORDS_SEED, W), so every
  method, bit length and seed meets the same short queries; the words are then weighted as the
  service weights a typed query (each word once: models/methods/compare.py);
- training (TrainConfig.short_view_weight) and its validation cut feature rows instead
  (short_rows): a kept word keeps its value in the row, and a tf-idf row is scaled back to unit
  length, as the vectorizer normalises a typed query. The two agree exactly for binary words,
  and for tf-idf words that occur once in their caption (most do).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.errors import InputError

QUERY_WORDS_SEED = 0  # seeds the words evaluation draws; fixed so that every run meets the same
QUERY_WORDS_MAX = 20  # the longest short query `--query-words` accepts


def parse_query_words(text: str) -> list[int]:
    """Word counts from "1,2,3" ("" or "none": no short queries); raises InputError otherwise."""
    if text.strip().lower() in ("", "none"):
        return []
    try:
        counts = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise InputError(
            f"expected comma-separated word counts like 1,2,3 for --query-words, got {text!r}"
        ) from None
    if any(not 1 <= w <= QUERY_WORDS_MAX for w in counts):
        raise InputError(f"expected word counts in 1..{QUERY_WORDS_MAX}, got {text!r}")
    return sorted(set(counts))


def query_words_rng(n_words: int) -> np.random.Generator:
    """The generator evaluation draws W-word queries with: seeded by (QUERY_WORDS_SEED, W)."""
    return np.random.default_rng([QUERY_WORDS_SEED, n_words])


def draw_words(
    columns: Sequence[np.ndarray], n_words: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per text, min(n_words, its count) of its distinct word columns, drawn without
    replacement, sorted (a text without a known word gives an empty array)."""
    out = []
    for cols in columns:
        if len(cols) <= n_words:
            out.append(np.sort(np.asarray(cols, dtype=np.intp)))
        else:
            out.append(np.sort(rng.choice(np.asarray(cols, dtype=np.intp), n_words, replace=False)))
    return out


def short_rows(
    features: np.ndarray,
    n_words: np.ndarray | int,
    rng: np.random.Generator,
    *,
    normalised: bool,
) -> np.ndarray:
    """(n, dim) float32 copies of bag-of-words `features` keeping, per row, n_words (a count, or
    one per row) of its nonzero columns drawn at random, all of them when it has fewer; the kept
    values are unchanged, or scaled to the row's unit length when `normalised` (tf-idf rows)."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise InputError(f"expected a (n, dim) feature matrix, got shape {x.shape}")
    want = np.broadcast_to(np.asarray(n_words, dtype=np.int64), (x.shape[0],))
    if want.size and want.min() < 1:
        raise InputError(f"expected at least 1 word per short text, got {int(want.min())}")
    # A random key per nonzero, +inf elsewhere: a row's n smallest keys are its n drawn words.
    keys = np.where(x != 0, rng.random(x.shape), np.inf)
    ranks = np.argsort(np.argsort(keys, axis=1, kind="stable"), axis=1, kind="stable")
    out = np.where(ranks < want[:, None], x, np.float32(0.0)).astype(np.float32)
    if normalised:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = np.divide(out, norms, out=out, where=norms > 0).astype(np.float32)
    return out
