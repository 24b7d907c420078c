"""Bag-of-words text features: English and Chinese (jieba) tokens, vocabulary from training texts.

The vocabulary is the `vocab_size` most frequent training tokens that occur in at least `min_df`
training texts, stored as JSON; unknown words are ignored, and a text with no known word still
encodes (to zeros) and is reported as such. scikit-learn chooses the vocabulary (`fit`); a text
is mapped with `tokenize` and one dict, word -> column, which is what CountVectorizer gives for
the same analyzer and vocabulary, without its per-call pipeline and sparse-matrix building.

A word's value in a text (`weighting`, chosen at training and saved with the checkpoint):
- "binary": 1 where the word occurs (the paper's and MIRFLICKR-25K's BoW; the default);
- "log": log(1 + count);
- "tfidf": count * idf, each text's row scaled to unit L2 length; idf is scikit-learn's smoothed
  idf, ln((1 + n) / (1 + df)) + 1, counted on the fitting texts only (`with_weighting`).
The count of a word is how often `tokenize` yields it (after lower-casing, stop words and jieba
segmentation): CountVectorizer(binary=False)'s count for the same analyzer. Each value is
computed in float64 from the text alone (no BLAS: math.fsum, math.log1p) and rounded once to
float32, so a text gets the same float32 values in a batch of 100,000 offline and alone in a
request: the offline features and the served codes come from the same numbers.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

from common.errors import InputError
from common.fsio import atomic_write_bytes

with warnings.catch_warnings():
    # jieba imports pkg_resources, which warns on every import with setuptools >= 80.
    warnings.simplefilter("ignore", UserWarning)
    import jieba

logger = logging.getLogger(__name__)
jieba.setLogLevel(logging.WARNING)

LANGUAGES = ("auto", "en", "zh")
# How a Chinese run becomes words (English is the same in both): "words" is jieba's accurate
# mode, one segmentation (the default); "search" is jieba's search-engine mode, which adds the
# shorter words inside each long one (新闻发布会 -> 新闻, 发布, 发布会, 新闻发布会), so texts that
# name the same thing in longer and shorter words share terms (an option beyond the paper).
TOKENIZATIONS = ("words", "search")
DEFAULT_TOKENS = "words"  # the paper's segmentation, and what files that name none were cut with
WEIGHTINGS = ("binary", "log", "tfidf")  # a word's value in a text: see the module docstring
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Function words that carry no topic in Chinese news text (jieba keeps them as tokens).
ZH_STOP_WORDS = frozenset(
    "的 了 和 是 在 也 有 与 及 等 为 对 将 被 把 从 这 那 就 都".split()
    + "而 并 但 其 之 或 中 上 下 个 年 月 日".split()
)


def tokenize(
    text: str,
    language: str = "auto",
    tokens_mode: str = DEFAULT_TOKENS,
    *,
    keep_stop_words: bool = False,
) -> list[str]:
    """Lower-cased word tokens; Chinese runs are segmented with jieba ("auto" picks per text),
    in accurate mode or, for tokens_mode "search", its search-engine mode (TOKENIZATIONS).
    Stop words are dropped unless `keep_stop_words` (to say which words a query ignores)."""
    text = text.lower()
    if language == "zh" or (language == "auto" and CJK.search(text)):
        stop: frozenset[str] = frozenset() if keep_stop_words else ZH_STOP_WORDS
        tokens = []
        cut = jieba.lcut_for_search if tokens_mode == "search" else jieba.lcut
        for tok in cut(text):
            tok = tok.strip()
            if tok and tok not in stop and (CJK.search(tok) or WORD.fullmatch(tok)):
                tokens.append(tok)
        return tokens
    stop = frozenset() if keep_stop_words else ENGLISH_STOP_WORDS
    return [t for t in WORD.findall(text) if t not in stop]


def load_segmenter() -> None:
    """Load jieba's dictionary now (about 0.6 s; jieba otherwise loads it at its first Chinese
    text: in the service, inside a request, holding the event loop)."""
    jieba.initialize()


def stop_words_for(text: str, language: str = "auto") -> frozenset[str]:
    """The stop words `tokenize` drops from this text (Chinese or English ones)."""
    if language == "zh" or (language == "auto" and CJK.search(text)):
        return ZH_STOP_WORDS
    return frozenset(ENGLISH_STOP_WORDS)


def smoothed_idf(document_frequency: np.ndarray, n_texts: int) -> np.ndarray:
    """(dim,) float64 idf = ln((1 + n) / (1 + df)) + 1, scikit-learn's TfidfTransformer default."""
    df = np.asarray(document_frequency, dtype=np.float64)
    out: np.ndarray = np.log((1.0 + n_texts) / (1.0 + df)) + 1.0
    return out


def check_tokens(tokens: str) -> None:
    """Raises InputError unless tokens is one of TOKENIZATIONS."""
    if tokens not in TOKENIZATIONS:
        raise InputError(f"expected text tokens in {', '.join(TOKENIZATIONS)}, got {tokens!r}")


def check_weighting(weighting: str, idf: Sequence[float] | np.ndarray | None, dim: int) -> None:
    """Raises InputError unless `weighting` is known and idf is given (dim positive finite
    numbers) exactly when it is "tfidf"."""
    if weighting not in WEIGHTINGS:
        raise InputError(f"expected a text weighting in {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if weighting != "tfidf":
        if idf is not None:
            raise InputError(f"expected no idf with text weighting {weighting!r}, got one")
        return
    if idf is None:
        raise InputError("expected an idf vector with text weighting 'tfidf', got none")
    arr = np.asarray(idf, dtype=np.float64)
    if arr.shape != (dim,) or not (np.isfinite(arr).all() and (arr > 0).all()):
        raise InputError(
            f"expected {dim} positive finite idf values (one per vocabulary word), "
            f"got shape {arr.shape}"
        )


class TextVectorizer:
    """Bag of words over a fixed vocabulary (fit on training texts only), weighted as chosen."""

    def __init__(
        self,
        vocabulary: Sequence[str],
        *,
        language: str = "auto",
        weighting: str = "binary",
        idf: Sequence[float] | np.ndarray | None = None,
        tokens: str = DEFAULT_TOKENS,
    ) -> None:
        if language not in LANGUAGES:
            raise InputError(f"expected a language in {', '.join(LANGUAGES)}, got {language!r}")
        check_tokens(tokens)
        if not vocabulary:
            raise InputError("expected a non-empty vocabulary, got none")
        check_weighting(weighting, idf, len(vocabulary))
        self.vocabulary = list(vocabulary)
        self.language = language
        self.tokens = tokens  # TOKENIZATIONS: how Chinese runs are segmented
        self.weighting = weighting
        # (dim,) float64 for "tfidf", else None
        self.idf = None if idf is None else np.array(idf, dtype=np.float64)
        self._column = {word: j for j, word in enumerate(self.vocabulary)}  # word -> column
        if len(self._column) != len(self.vocabulary):
            # The dict keeps a repeated word's last column: its first occurrence differs.
            twice = next(w for j, w in enumerate(self.vocabulary) if self._column[w] != j)
            raise InputError(f"expected a vocabulary of distinct words, got {twice!r} twice")

    @classmethod
    def fit(
        cls,
        texts: Sequence[str],
        *,
        vocab_size: int = 2000,
        min_df: int = 2,
        language: str = "auto",
        weighting: str = "binary",
        tokens: str = DEFAULT_TOKENS,
    ) -> TextVectorizer:
        """Choose the vocabulary (and for "tfidf" the idf) from training texts; raises
        InputError when no word is left."""
        if vocab_size < 1:
            raise InputError(f"expected vocab_size >= 1, got {vocab_size}")
        if weighting not in WEIGHTINGS:
            raise InputError(
                f"expected a text weighting in {', '.join(WEIGHTINGS)}, got {weighting!r}"
            )
        check_tokens(tokens)
        counter = CountVectorizer(
            analyzer=lambda t: tokenize(t, language, tokens),
            binary=True,
            min_df=min(min_df, max(1, len(texts))),
            max_features=vocab_size,
        )
        try:
            counter.fit(list(texts))
        except ValueError as err:  # sklearn: "empty vocabulary"
            raise InputError(f"expected training texts with words, got: {err}") from err
        vocabulary = sorted(counter.vocabulary_, key=counter.vocabulary_.__getitem__)
        logger.info("fitted a %d-word vocabulary on %d texts", len(vocabulary), len(texts))
        return cls(vocabulary, language=language, tokens=tokens).with_weighting(weighting, texts)

    def with_weighting(self, weighting: str, texts: Sequence[str]) -> TextVectorizer:
        """The same vocabulary weighted as `weighting`; "tfidf" counts its idf on `texts` (the
        fitting texts only), the other weightings ignore them."""
        idf = None
        if weighting == "tfidf":
            df = np.zeros(self.dim, dtype=np.int64)
            for cols in self.columns(texts):
                df[cols] += 1
            idf = smoothed_idf(df, len(texts))
        return TextVectorizer(
            self.vocabulary,
            language=self.language,
            weighting=weighting,
            idf=idf,
            tokens=self.tokens,
        )

    @property
    def dim(self) -> int:
        """The vector length (vocabulary size)."""
        return len(self.vocabulary)

    def columns(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per text, the sorted distinct columns (intp) of its known words (its nonzeros)."""
        column, language, mode = self._column, self.language, self.tokens
        out = []
        for text in texts:
            found = {column[t] for t in tokenize(text, language, mode) if t in column}
            out.append(np.array(sorted(found), dtype=np.intp))
        return out

    def counts(self, texts: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per text, its sorted distinct columns (intp) and each one's count (int64)."""
        column, language, mode = self._column, self.language, self.tokens
        cols_out, counts_out = [], []
        for text in texts:
            found = sorted(
                Counter(column[t] for t in tokenize(text, language, mode) if t in column).items()
            )
            cols_out.append(np.fromiter((j for j, _ in found), np.intp, len(found)))
            counts_out.append(np.fromiter((c for _, c in found), np.int64, len(found)))
        return cols_out, counts_out

    def weighted(self, texts: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per text, its sorted distinct columns (intp) and their float32 values (the weighting's;
        see the module docstring). No dense row is built."""
        if self.weighting == "binary":
            columns = self.columns(texts)
            return columns, [np.ones(len(c), dtype=np.float32) for c in columns]
        columns, counts = self.counts(texts)
        return columns, [self._values(c, n) for c, n in zip(columns, counts, strict=True)]

    def values_of(self, cols: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(k,) float32 values of one text's sorted distinct columns with these counts (int64)."""
        if self.weighting == "binary":
            return np.ones(len(cols), dtype=np.float32)
        return self._values(cols, counts)

    def _values(self, cols: np.ndarray, counts: np.ndarray) -> np.ndarray:
        if self.weighting == "log":
            return np.array([math.log1p(c) for c in counts.tolist()], dtype=np.float32)
        assert self.idf is not None  # checked at construction for "tfidf"
        tf_idf = counts * self.idf[cols]  # (k,) float64
        norm = math.sqrt(math.fsum((tf_idf * tf_idf).tolist()))  # correctly rounded sum
        out: np.ndarray = (tf_idf / max(norm, 1e-300)).astype(np.float32)
        return out

    def dense(
        self, columns: Sequence[np.ndarray], values: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        """(n, dim) float32 vectors with `values` (ones when None) at `columns` (as `columns`
        or `weighted` gives them)."""
        matrix = np.zeros((len(columns), self.dim), dtype=np.float32)
        if values is None:
            for row, cols in zip(matrix, columns, strict=True):
                row[cols] = 1.0
            return matrix
        for row, cols, vals in zip(matrix, columns, values, strict=True):
            row[cols] = vals
        return matrix

    def transform(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) float32 weighted vectors, and (n,) bool: True where a text had no known word."""
        columns, values = self.weighted(texts)
        return self.dense(columns, values), np.array([len(c) == 0 for c in columns], dtype=bool)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form: vocabulary, language, tokens, weighting and ("tfidf") the idf."""
        out: dict[str, Any] = {
            "vocabulary": self.vocabulary,
            "language": self.language,
            "tokens": self.tokens,
            "weighting": self.weighting,
        }
        if self.idf is not None:
            out["idf"] = self.idf.tolist()  # float64 repr: reads back to the same numbers
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextVectorizer:
        """The vectorizer `to_dict` (or `to_json`, parsed) wrote; without "weighting" (files
        written before weighting existed) it is binary, without "tokens" accurate-mode words.
        Raises InputError on anything else."""
        if not isinstance(data, dict) or not isinstance(data.get("vocabulary"), list):
            raise InputError(f"expected a vectorizer object with a vocabulary, got {type(data)}")
        known = {"vocabulary", "language", "tokens", "weighting", "idf"}
        if set(data) - known:
            raise InputError(f"expected vectorizer keys in {sorted(known)}, got {sorted(data)}")
        return cls(
            data["vocabulary"],
            language=data.get("language", "auto"),
            weighting=data.get("weighting", "binary"),
            idf=data.get("idf"),
            tokens=data.get("tokens", DEFAULT_TOKENS),
        )

    def to_json(self) -> str:
        """The vectorizer as JSON (`to_dict`)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    def save(self, path: Path) -> None:
        """Write the JSON form to path (an export for people and other tools: the checkpoint
        carries the vocabulary and weighting the service uses), atomically."""
        atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))
