"""Bag-of-words text features: English and Chinese (jieba) tokens, vocabulary from training texts.

The vectors are binary (a word is present or not), as in the BoW features of MIRFLICKR-25K and
NUS-WIDE. The vocabulary is the `vocab_size` most frequent training tokens that occur in at least
`min_df` training texts, stored as JSON; unknown words are ignored, and a text with no known word
still encodes (to zeros) and is reported as such. scikit-learn chooses the vocabulary (`fit`);
a text is mapped with `tokenize` and one dict, word -> column (`columns`), which is what
CountVectorizer(binary=True) gives for the same analyzer and vocabulary, without its per-call
pipeline and sparse-matrix building.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

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
CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Function words that carry no topic in Chinese news text (jieba keeps them as tokens).
ZH_STOP_WORDS = frozenset(
    "的 了 和 是 在 也 有 与 及 等 为 对 将 被 把 从 这 那 就 都".split()
    + "而 并 但 其 之 或 中 上 下 个 年 月 日".split()
)


def tokenize(text: str, language: str = "auto") -> list[str]:
    """Lower-cased word tokens; Chinese runs are segmented with jieba ("auto" picks per text)."""
    text = text.lower()
    if language == "zh" or (language == "auto" and CJK.search(text)):
        tokens = []
        for tok in jieba.lcut(text):
            tok = tok.strip()
            if tok and tok not in ZH_STOP_WORDS and (CJK.search(tok) or WORD.fullmatch(tok)):
                tokens.append(tok)
        return tokens
    return [t for t in WORD.findall(text) if t not in ENGLISH_STOP_WORDS]


class TextVectorizer:
    """Binary bag of words over a fixed vocabulary (fit on training texts only)."""

    def __init__(self, vocabulary: Sequence[str], *, language: str = "auto") -> None:
        if language not in LANGUAGES:
            raise InputError(f"expected a language in {', '.join(LANGUAGES)}, got {language!r}")
        if not vocabulary:
            raise InputError("expected a non-empty vocabulary, got none")
        self.vocabulary = list(vocabulary)
        self.language = language
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
    ) -> TextVectorizer:
        """Choose the vocabulary from training texts; raises InputError when none is left."""
        if vocab_size < 1:
            raise InputError(f"expected vocab_size >= 1, got {vocab_size}")
        counter = CountVectorizer(
            analyzer=lambda t: tokenize(t, language),
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
        return cls(vocabulary, language=language)

    @property
    def dim(self) -> int:
        """The vector length (vocabulary size)."""
        return len(self.vocabulary)

    def columns(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per text, the sorted distinct columns (intp) of its known words (its vector's ones)."""
        column, language = self._column, self.language
        out = []
        for text in texts:
            found = {column[t] for t in tokenize(text, language) if t in column}
            out.append(np.array(sorted(found), dtype=np.intp))
        return out

    def dense(self, columns: Sequence[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 binary vectors with ones at `columns` (as `columns` gives them)."""
        matrix = np.zeros((len(columns), self.dim), dtype=np.float32)
        for row, cols in zip(matrix, columns, strict=True):
            row[cols] = 1.0
        return matrix

    def transform(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) float32 binary vectors, and (n,) bool: True where a text had no known word."""
        columns = self.columns(texts)
        return self.dense(columns), np.array([len(c) == 0 for c in columns], dtype=bool)

    def to_json(self) -> str:
        """The vectorizer as JSON (vocabulary and language)."""
        return json.dumps(
            {"vocabulary": self.vocabulary, "language": self.language}, ensure_ascii=False
        )

    def save(self, path: Path) -> None:
        """Write the JSON form to path (an export for people and other tools: the checkpoint
        carries the vocabulary the service uses), atomically."""
        atomic_write_bytes(Path(path), self.to_json().encode("utf-8"))
