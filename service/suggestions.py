"""Words to offer on the page's "Try:" row: from the served model's vocabulary and the
collection it serves (models/features/query_words.py suggested_words), for any collection."""

from __future__ import annotations

import threading

from models.features.query_words import suggested_words
from models.features.text import TextVectorizer
from store.backend import ItemStore

SAMPLE_TEXTS = 2_000  # stored texts read to count the words of the collection
MAX_SUGGESTIONS = 50  # words one request may ask for


class Suggestions:
    """The suggested words, counted again only when the store has changed (thread-safe)."""

    def __init__(self, vectorizer: TextVectorizer, store: ItemStore) -> None:
        self._vectorizer = vectorizer
        self._store = store
        self._lock = threading.Lock()  # one count at a time; readers of the last one wait
        self._counted: tuple[tuple[int, int], list[str]] | None = None

    def words(self, n: int) -> list[str]:
        """Up to n words (n <= MAX_SUGGESTIONS) for the store as it is now."""
        view = self._store.view()
        state = (view.commit, view.count)
        with self._lock:
            if self._counted is None or self._counted[0] != state:
                texts = self._store.sample_texts(SAMPLE_TEXTS)
                self._counted = (state, suggested_words(self._vectorizer, texts, MAX_SUGGESTIONS))
            return self._counted[1][:n]
