"""An immutable view of a store: its segments and growing part, each with its live mask.

A search reads one View from start to end; writes publish a new View in one assignment, so a
search is never torn and never waits for a write. Each part is searched exactly (deleted rows
masked out in the scan), the scan pieces of all parts in one round of the threads
(indexes.hamming.search_parts), and the parts' answers are merged by (distance, seq): seqs grow
with insertion, so ties come out in insertion order across parts, as within one index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from indexes.asymmetric import Asymmetric
from indexes.hamming import HammingIndex, LiveMask, search_parts
from indexes.results import padded

Target = Literal["image", "text"]


@dataclass(frozen=True)
class Part:
    """A segment (or the growing part): two indexes whose ids are the rows' seqs, and a mask."""

    name: str  # the segment file name, or "growing"
    image: HammingIndex  # ids = seqs, ascending
    text: HammingIndex
    live: LiveMask | None  # None: every row is live

    @property
    def seqs(self) -> np.ndarray:
        """(n,) int64 ascending seqs of the rows (live or not)."""
        return self.image.ids

    @property
    def n_live(self) -> int:
        """How many rows are live."""
        return len(self.image) if self.live is None else self.live.count

    def index_for(self, target: Target) -> HammingIndex:
        """The index of the target modality."""
        return self.image if target == "image" else self.text


@dataclass(frozen=True)
class View:
    """One committed state: the parts in seq order and the commit it shows."""

    commit: int  # the store's commit number when this view was published
    parts: tuple[Part, ...]

    @property
    def count(self) -> int:
        """How many items are live."""
        return sum(p.n_live for p in self.parts)

    def scan_words(self, target: Target) -> int:
        """How many uint64 words of codes one query's scan of `target` reads (dead rows too)."""
        indexes = [p.index_for(target) for p in self.parts]
        return sum(len(index) * index.n_words for index in indexes)

    def search(
        self,
        target: Target,
        queries: np.ndarray,
        k: int,
        *,
        one_thread: bool = False,
        asymmetric: Asymmetric | None = None,
        radius: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(dists int32 (m, k), seqs int64 (m, k)) over every part; FAISS padding (-1).
        `one_thread`: scanned on this thread alone; `asymmetric` (dists are then weighted
        distances) and `radius`: as indexes.hamming.search_parts."""
        searched = [(p.index_for(target), p.live) for p in self.parts if p.n_live]
        if not searched:
            m = queries.shape[0]
            return padded(m, k)
        return search_parts(
            searched, queries, k, one_thread=one_thread, asymmetric=asymmetric, radius=radius
        )

    def codes_of(self, target: Target, seqs: np.ndarray) -> np.ndarray:
        """(n, n_words) uint64 codes of the rows with these seqs (each in some part)."""
        firsts = np.array([int(p.seqs[0]) for p in self.parts], dtype=np.int64)
        owner = np.searchsorted(firsts, seqs, side="right") - 1  # (n,) the part of each seq
        words = self.parts[0].index_for(target).n_words if self.parts else 1
        out = np.zeros((seqs.shape[0], words), dtype=np.uint64)
        for i in np.unique(owner).tolist():
            index = self.parts[i].index_for(target)
            rows = np.flatnonzero(owner == i)
            out[rows] = index.codes[np.searchsorted(index.ids, seqs[rows])]
        return out
