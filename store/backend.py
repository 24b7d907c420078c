"""ItemStore: what the service needs of a store, satisfied by the local Store and MilvusStore.

The service reads and writes items only through these methods, so one `Loaded.store` serves
either backend. What only one backend has (the local store's compaction, live rows)
is not part of it: code that needs those takes a `Store`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from indexes.asymmetric import Asymmetric
from store.filters import Filter
from store.ids import ItemId
from store.metadata import Item
from store.rows import NewItems
from store.store import Deleted, Hits, OnConflict
from store.view import Target


class StoreView(Protocol):
    """What the service reads of a store's current state."""

    @property
    def commit(self) -> int:
        """The commit (local store) or last write's seq (Milvus) this state shows."""
        ...

    @property
    def count(self) -> int:
        """Live items."""
        ...

    @property
    def parts(self) -> tuple[object, ...]:
        """The searched parts (segments); empty when the backend manages its own."""
        ...


class ItemStore(Protocol):
    """A store the service can serve: search, read, add and delete items."""

    @property
    def artifacts(self) -> Path:
        """The artifacts folder that stored image references are relative to."""
        ...

    def __len__(self) -> int:
        """Live items."""
        ...

    def view(self) -> StoreView:
        """The current state."""
        ...

    def existing(self, ids: Sequence[ItemId]) -> set[ItemId]:
        """Which of ids are stored."""
        ...

    def get(self, item_id: ItemId) -> Item | None:
        """The item stored under item_id, or None."""
        ...

    def search(
        self,
        target: Target,
        queries: np.ndarray,
        k: int,
        *,
        where: Filter | None = None,
        asymmetric: Asymmetric | None = None,
        radius: int | None = None,
    ) -> Hits:
        """Exact top-k of each query among stored items (that pass `where`), by Hamming
        distance or `asymmetric`'s weighted distance, within a Hamming `radius`."""
        ...

    def search_now(
        self,
        target: Target,
        queries: np.ndarray,
        k: int,
        *,
        asymmetric: Asymmetric | None = None,
        radius: int | None = None,
    ) -> Hits | None:
        """search() without a filter if it can be answered without waiting (for a lock, another
        thread or the network), else None: the caller then calls search() where it may wait."""
        ...

    def sample_texts(self, n: int) -> list[str]:
        """The texts of at most n stored items, spread over the collection where it can."""
        ...

    def add(self, batch: NewItems, *, on_conflict: OnConflict = "error") -> int:
        """Commit a batch; the commit number (or seq) it made."""
        ...

    def delete(self, ids: Sequence[ItemId]) -> Deleted:
        """Remove these ids; those that were stored and the commit that removed them."""
        ...

    def close(self) -> None:
        """Release files and connections."""
        ...
