"""Serving searches from Milvus (settings: CMH_INDEX_BACKEND=milvus, CMH_MILVUS_URI).

The store stays the record (metadata, the commit point, the segment files); Milvus holds a copy
of every live code in two collections named after the store (`cmh_<store id>_image` / `_text`),
keyed by the rows' seqs, and answers the searches. The copy is kept in step in O(batch): the
store tells the mirror of each committed add and delete (store.Listener). At startup a
collection whose size differs from the store's (new, or left behind by a crash between a commit
and its mirroring) is dropped and filled again from the store.
"""

from __future__ import annotations

import logging

import numpy as np

from indexes.milvus import MilvusHammingIndex
from store.store import Store
from store.view import Target

logger = logging.getLogger(__name__)


class MilvusMirror:
    """The store's live codes in Milvus: a store Listener and a Searcher."""

    def __init__(self, store: Store, *, uri: str, token: str = "") -> None:
        self.uri = uri
        self.token = token
        base = f"cmh_{store.store_id}"
        self.indexes = {
            target: MilvusHammingIndex(
                store.n_bits, uri=uri, collection=f"{base}_{target}", token=token
            )
            for target in ("image", "text")
        }
        if any(len(index) != len(store) for index in self.indexes.values()):
            self._refill(store)
        store.listener = self
        logger.info("serving %d items from Milvus at %s (%s_*)", len(store), uri, base)

    def _refill(self, store: Store) -> None:
        seqs, image, text = store.live_rows()
        for target, codes in (("image", image), ("text", text)):
            index = self.indexes[target]
            index.drop()
            index = MilvusHammingIndex(
                store.n_bits, uri=self.uri, collection=index.collection, token=self.token
            )
            index.add(codes, seqs)
            self.indexes[target] = index
        logger.info("filled Milvus with the store's %d live rows", seqs.size)

    def added(self, seqs: np.ndarray, image_codes: np.ndarray, text_codes: np.ndarray) -> None:
        """Copy newly committed rows."""
        self.indexes["image"].add(image_codes, seqs)
        self.indexes["text"].add(text_codes, seqs)

    def deleted(self, seqs: np.ndarray) -> None:
        """Remove deleted rows."""
        for index in self.indexes.values():
            index.remove(seqs)

    def search(self, target: Target, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(dists, seqs) of the k nearest rows, as View.search gives them."""
        return self.indexes[target].search(queries, k)

    def close(self) -> None:
        """Close the connections."""
        for index in self.indexes.values():
            index.close()
