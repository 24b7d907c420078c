"""The one in-memory shape every dataset source is loaded into."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.errors import InputError


@dataclass(frozen=True)
class Rejection:
    """A listed pair that could not be loaded, or a defect met while loading one."""

    pair: str  # which pair, as the source lists it (e.g. "line 17: 22\t22\t1")
    reason: str  # what is wrong with it


@dataclass(frozen=True)
class PairDataset:
    """N image-text pairs, their labels (evaluation only) and the protocol's splits.

    Images come as features (`image_features`, (N, d_img) float32) or as files (`image_paths`);
    texts as raw strings (`texts`) or as features (`text_features`, (N, d_txt) float32). `labels`
    is (N, C) uint8 multi-hot. `train_idx`, `query_idx` and `database_idx` index rows; train and
    database may overlap (unsupervised methods train on the database), queries never overlap the
    database.
    """

    name: str
    ids: list[str]  # (N,) the pair ids as the source names them
    labels: np.ndarray  # (N, C) uint8 multi-hot
    train_idx: np.ndarray  # (n_train,) int64
    query_idx: np.ndarray  # (n_query,) int64
    database_idx: np.ndarray  # (n_db,) int64
    label_names: list[str] = field(default_factory=list)  # (C,)
    image_features: np.ndarray | None = None  # (N, d_img) float32
    image_paths: list[Path] | None = None  # (N,)
    text_features: np.ndarray | None = None  # (N, d_txt) float32
    texts: list[str] | None = None  # (N,)
    extra: list[dict[str, object]] | None = None  # (N,) each pair's other source fields, kept as is
    listed: int = 0  # how many pairs the source lists (loaded + rejected)
    rejected: list[Rejection] = field(default_factory=list)  # pairs not loaded, with reasons
    defects: list[Rejection] = field(default_factory=list)  # pairs loaded despite a defect
    protocol: str = ""  # one line: how queries and database were chosen
    image_backbone: str = ""  # what made image_features (e.g. "efficientnet-lite0", "sift-bovw")
    vocabulary: list[str] | None = None  # BoW terms in text_features column order, when BoW
    # How its Chinese words were cut: features/text.py DEFAULT_TOKENS (data sits below features).
    text_tokens: str = "words"
    # How text_features weight a word (features/text.py WEIGHTINGS): "binary", "log" or "tfidf".
    text_weighting: str = "binary"
    # (n_indexed,) int64: the pairs a build indexes, where the source says (a pairs file: its
    # database, so lines of split "query" or "train" are never searched); None: every pair (the
    # loaders' query splits are evaluation protocols, not properties of the data).
    indexed_idx: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.labels.shape[0] != n:
            raise InputError(f"expected {n} label rows, got {self.labels.shape[0]}")
        for name in ("image_features", "text_features"):
            arr = getattr(self, name)
            if arr is not None and arr.shape[0] != n:
                raise InputError(f"expected {n} rows of {name}, got {arr.shape[0]}")
        for name in ("image_paths", "texts", "extra"):
            seq = getattr(self, name)
            if seq is not None and len(seq) != n:
                raise InputError(f"expected {n} {name}, got {len(seq)}")

    def __len__(self) -> int:
        return len(self.ids)

    def with_features(
        self,
        *,
        image: np.ndarray,
        text: np.ndarray,
        image_backbone: str,
        vocabulary: list[str] | None,
        text_tokens: str = "words",
        text_weighting: str = "binary",
    ) -> PairDataset:
        """A copy with image and text feature matrices set (rows aligned with `ids`)."""
        return replace(
            self,
            image_features=np.ascontiguousarray(image, dtype=np.float32),
            text_features=np.ascontiguousarray(text, dtype=np.float32),
            image_backbone=image_backbone,
            vocabulary=vocabulary,
            text_tokens=text_tokens,
            text_weighting=text_weighting,
        )

    def split_sizes(self) -> dict[str, int]:
        """Sizes of the train, query and database splits."""
        return {
            "train": int(self.train_idx.size),
            "query": int(self.query_idx.size),
            "database": int(self.database_idx.size),
        }


def seeded_query_split(n: int, *, n_query: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) into (query_idx, rest_idx) by a seeded permutation; both sorted, int64."""
    if not 0 < n_query < n:
        raise InputError(f"expected 0 < n_query < {n}, got {n_query}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_query]).astype(np.int64), np.sort(order[n_query:]).astype(np.int64)
