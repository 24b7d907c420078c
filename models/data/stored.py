"""The items a store serves as a dataset: what `cmh train --from-store` trains on.

Given each item's id, caption, image (a path relative to the artifacts folder, as the store
keeps it: `images/<sha256>.<ext>`) and user fields, in the store's order. Protocol: every item
is trained on and is the database; there are no queries (validation is carved out of training
as for any dataset). An item whose fields hold `labels` (a list of label names, as a pairs file's
`labels`, or one name) gives evaluation labels, label_names being their sorted union; with none
anywhere, validation scores each pair's own partner. An item whose image file is gone (deleted
since it was read) or lies outside the folder is rejected; malformed `labels` are a defect, the
item is loaded without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InputError
from models.data.dataset import PairDataset, Rejection

NAME = "store"


def _labels(fields: dict[str, Any]) -> list[str] | None:
    """The label names in fields["labels"] ([] without the key), None when malformed."""
    value = fields.get("labels", [])
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        return None
    return sorted({n.strip() for n in names})


def stored_pairs(
    artifacts: Path,
    *,
    ids: Sequence[object],
    texts: Sequence[str],
    images: Sequence[str],
    fields: Sequence[dict[str, Any]],
    n_live: int,
) -> PairDataset:
    """A PairDataset of stored items (see the module docstring); n_live: how many the store
    held, of which these are all or a sample."""
    base = artifacts.resolve()
    kept: list[int] = []
    paths: list[Path] = []
    item_labels: list[list[str]] = []
    rejected: list[Rejection] = []
    defects: list[Rejection] = []
    for i, image in enumerate(images):
        path = (base / image).resolve()
        if not path.is_relative_to(base):
            rejected.append(Rejection(f"item {ids[i]!r}", f"image outside {base}: {image!r}"))
            continue
        if not path.is_file():  # its item deleted, and the image collected, since the read
            rejected.append(Rejection(f"item {ids[i]!r}", f"missing image file: {image!r}"))
            continue
        labels = _labels(fields[i])
        if labels is None:
            defects.append(Rejection(f"item {ids[i]!r}", "invalid labels: expected label names"))
        kept.append(i)
        paths.append(path)
        item_labels.append(labels or [])
    if not kept:
        raise InputError(f"expected stored items with their images in {artifacts}, got none")
    label_names = sorted({n for names in item_labels for n in names})
    column = {n: j for j, n in enumerate(label_names)}
    matrix = np.zeros((len(kept), len(label_names)), dtype=np.uint8)  # (N, C)
    for row, names in enumerate(item_labels):
        matrix[row, [column[n] for n in names]] = 1
    every = np.arange(len(kept), dtype=np.int64)
    sample = (
        f"all {n_live}"
        if len(images) == n_live
        else f"a seeded sample of {len(images)} of {n_live}"
    )
    return PairDataset(
        name=NAME,
        ids=[str(ids[i]) for i in kept],
        labels=matrix,
        train_idx=every,
        query_idx=np.empty(0, dtype=np.int64),
        database_idx=every,
        label_names=label_names,
        image_paths=paths,
        texts=[texts[i] for i in kept],
        extra=[fields[i] for i in kept],
        listed=len(images),
        rejected=rejected,
        defects=defects,
        protocol=f"database = train = {sample} live items of the store; no queries",
    )
