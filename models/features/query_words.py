"""What people type, read against a vocabulary: each query word is used, mapped or ignored.

A query is cut as the training texts were (models/features/text.py `tokenize`: the checkpoint's
language and Chinese segmentation), and a word the vocabulary knows is used as it is. A word it
does not know falls back, in this order, to:
- a Chinese compound's known parts: jieba's search mode cuts it into the shorter words inside
  it (足球比赛 -> 足球, 比赛), and the known ones that do not overlap are used, longest first,
  then the more frequent in jieba's dictionary (大熊猫 -> 熊猫 rather than 大熊); what they leave
  uncovered is listed as unknown. Under the "search" segmentation the cut already yields the
  parts, so nothing is added;
- an English inflection's known form: the Snowball English stemmer maps the word and every
  known English word to a stem, and the shortest known word with the word's stem is used
  (cars -> car, running -> run).
Before the cut, full-width ASCII (ＣＡＲ, ２０２４) and the ideographic space become their ASCII
forms; the cut lower-cases.

Why at query time only (not in training's cut): every fallback applies to a word the vocabulary
lacks, and such a word gives a training text no column at all; the training cut is what the
vocabulary was counted and the model trained on, so changing it would change every trained
model's features (and their published figures), while a query word the model has no column for
is otherwise simply lost. Full-width ASCII is never kept by the training cut (it is neither a
CJK character nor [a-z0-9]), so folding it only gives a query words the cut would have dropped.
Stop words are ignored at training and at query time, and listed among the unknown words.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import jieba
import numpy as np
import snowballstemmer

from models.features.text import (
    CJK,
    WORD,
    ZH_STOP_WORDS,
    TextVectorizer,
    stop_words_for,
    tokenize,
)

FALLBACK_CACHE = 65_536  # unknown query words whose fallback is remembered
# Full-width ASCII (U+FF01..U+FF5E) and the ideographic space, to their ASCII forms.
FULL_WIDTH = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}


@dataclass(frozen=True)
class QueryText:
    """One query read against the vocabulary."""

    columns: np.ndarray  # (c,) intp sorted distinct columns of the words used
    values: np.ndarray  # (c,) float32 their values under the vectorizer's weighting
    used: list[str]  # vocabulary words the query's code is made of, in query order
    unknown: list[str]  # query words ignored (not known, no fallback, or stop words)


class QueryReader:
    """Reads queries for one vectorizer (thread-safe: its cache and its stemmer have locks)."""

    def __init__(self, vectorizer: TextVectorizer) -> None:
        self.vectorizer = vectorizer
        self._column = {word: j for j, word in enumerate(vectorizer.vocabulary)}
        self._stemmer = snowballstemmer.stemmer("english")
        self._stemming = threading.Lock()
        english = [w for w in vectorizer.vocabulary if WORD.fullmatch(w)]
        by_stem: dict[str, str] = {}
        for word, stem in zip(english, self._stemmer.stemWords(english), strict=True):
            kept = by_stem.get(stem)
            if kept is None or (len(word), word) < (len(kept), kept):
                by_stem[stem] = word
        self._by_stem = by_stem
        # A word's fallback is a pure function of it; the Snowball stemmer is pure Python (about
        # 80 us a word), so repeated query words are remembered (functools' cache has its lock).
        self._cached = functools.lru_cache(maxsize=FALLBACK_CACHE)(self._fallback)

    def read(self, text: str) -> QueryText:
        """The words of `text` the vocabulary knows (after the fallbacks) and those it does not."""
        vec = self.vectorizer
        folded = text.translate(FULL_WIDTH)
        stop = stop_words_for(folded, vec.language)
        used: list[str] = []
        unknown: list[str] = []
        for token in tokenize(folded, vec.language, vec.tokens, keep_stop_words=True):
            if token in stop:  # ignored as training ignores it, with no fallback
                unknown.append(token)
                continue
            if token in self._column:
                used.append(token)
                continue
            found, missed = self._cached(token)
            used += found
            unknown += missed
        counts = Counter(self._column[w] for w in used)
        columns = np.array(sorted(counts), dtype=np.intp)
        n = np.array([counts[j] for j in columns.tolist()], dtype=np.int64)
        return QueryText(columns, vec.values_of(columns, n), _distinct(used), _distinct(unknown))

    def _fallback(self, token: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the known words an unknown token stands for, the parts of it left unknown)."""
        if CJK.search(token):
            parts, missed = self._known_parts(token)
            if self.vectorizer.tokens == "search":  # the cut itself already yields the parts
                parts = []
            return tuple(parts), tuple(missed)
        if WORD.fullmatch(token):
            with self._stemming:  # a stemmer object keeps state while it stems
                stem = self._stemmer.stemWord(token)
            word = self._by_stem.get(stem)
            return ((), (token,)) if word is None else ((word,), ())
        return (), (token,)

    def _known_parts(self, token: str) -> tuple[list[str], list[str]]:
        """The known, non-overlapping words of jieba's search cut inside a compound, in order,
        and the words of what they leave uncovered (the whole token when nothing is known)."""
        parts = {
            p for p in jieba.lcut_for_search(token) if p != token and p in self._column
        } - ZH_STOP_WORDS
        taken = [False] * len(token)
        chosen: list[tuple[int, str]] = []
        for part in sorted(parts, key=lambda p: (-len(p), -(jieba.get_FREQ(p) or 0), p)):
            start = token.find(part)
            while start >= 0 and any(taken[start : start + len(part)]):
                start = token.find(part, start + 1)
            if start >= 0:
                taken[start : start + len(part)] = [True] * len(part)
                chosen.append((start, part))
        if not chosen:
            return [], [token]
        rest = "".join(c if not t else " " for c, t in zip(token, taken, strict=True)).split()
        missed = [w for run in rest for w in jieba.lcut(run) if w.strip()]
        return [part for _, part in sorted(chosen)], missed


def suggested_words(vectorizer: TextVectorizer, texts: Sequence[str], n: int) -> list[str]:
    """Up to n vocabulary words to offer a person who does not know the vocabulary: those of
    the collection's `texts` (the training cut) that are frequent and informative, ranked by
    df * ln(N / df) (a word in half the texts tells little; one in a single text is rare).
    Numbers and single letters are left out; ties by the vocabulary's order."""
    df = np.zeros(vectorizer.dim, dtype=np.int64)
    for cols in vectorizer.columns(texts):
        df[cols] += 1
    total = max(len(texts), 1)
    worth = np.where(df >= 2, df * np.log(total / np.maximum(df, 1)), 0.0)
    out: list[str] = []
    for j in np.argsort(-worth, kind="stable").tolist():
        word = vectorizer.vocabulary[j]
        if worth[j] <= 0 or len(out) == n:
            break
        if not word.isdigit() and len(word) > (0 if CJK.search(word) else 1):
            out.append(word)
    return out


def _distinct(words: list[str]) -> list[str]:
    return list(dict.fromkeys(words))
