"""Indexing: build items and dataset pairs -> codes -> the store; one path for HTTP and CLI.

An item batch (a build request's `items`) succeeds or fails as a whole: every item is validated
first (ids, texts, images decoded under the size and pixel limits), and any failure leaves the
store as it was. A dataset is streamed in chunks of CHUNK pairs (read, decode, encode, commit),
so memory is bounded by the chunk whatever the dataset's size; ids already in the store are
skipped (reported in `skipped`), which makes an interrupted build resumable by running it again.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.errors import InputError
from indexes.codes import n_words
from models.data import PairDataset
from service.encoder import Encoder
from service.schemas import BuildItem, ErrorItem
from service.uploads import decode_image, inside
from store.ids import ItemId, parse_id
from store.store import NewItems, OnConflict, Store

logger = logging.getLogger(__name__)

FEATURE_BATCH = 32  # images per backbone call
CHUNK = 256  # dataset pairs in memory at once
Progress = Callable[[int, int], None]


class BuildFailed(InputError):
    """A batch that failed validation: the message, and one entry per bad item."""

    def __init__(self, message: str, errors: list[ErrorItem]) -> None:
        super().__init__(message)
        self.errors = errors


@dataclass
class Pending:
    """A validated item: its id, text, image bytes and extension, and the user's fields."""

    id: ItemId
    text: str
    data: bytes
    extension: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetOutcome:
    """What a dataset build did: items added, and pairs skipped with the reason."""

    added: int
    skipped: list[str]
    commit: int


def dataset_ids(data: PairDataset) -> list[ItemId]:
    """Store ids for a dataset's pairs.

    The benchmark layouts (demo, Web News) name pairs by numbers, which are indexed as integers
    (leading zeros dropped, as they always were); `pairs` ids are the user's, canonicalised.
    """
    if data.name == "pairs":
        return [parse_id(i) for i in data.ids]
    return [int(i) if i.isascii() and i.isdigit() else parse_id(i) for i in data.ids]


class Indexer:
    """Validates, encodes and commits build items to the store."""

    def __init__(self, *, store: Store, encoder: Encoder, max_pixels: int) -> None:
        self.store = store
        self.encoder = encoder
        self.max_pixels = max_pixels

    def validate_items(
        self,
        items: list[BuildItem],
        *,
        data_dir: Path | None,
        max_image_bytes: int,
        on_conflict: OnConflict,
    ) -> list[Pending]:
        """Check every item; raises BuildFailed listing each bad one, else the pending items."""
        errors: list[ErrorItem] = []
        pending: list[Pending] = []
        seen: set[ItemId] = set()
        ids = [item.id for item in items]
        present = self.store.existing(ids) if on_conflict == "error" else set()
        for index, item in enumerate(items):
            try:
                if item.id in seen:
                    raise InputError(f"expected unique ids, got id {item.id!r} twice in this batch")
                seen.add(item.id)
                if item.id in present:
                    raise InputError(f"expected a new id, got {item.id!r}: already indexed")
                data = _image_bytes(item, data_dir, max_image_bytes)
                _, extension = decode_image(data, max_pixels=self.max_pixels)
                pending.append(Pending(item.id, item.text, data, extension, dict(item.fields)))
            except InputError as err:
                errors.append(ErrorItem(index=index, id=item.id, reason=str(err)))
        if errors:
            raise BuildFailed(f"{len(errors)} of {len(items)} items are invalid", errors)
        return pending

    def add(
        self, pending: Sequence[Pending], progress: Progress, *, on_conflict: OnConflict
    ) -> int:
        """Encode pending items and commit them to the store in one write; the commit number."""
        image_codes = []
        for start in range(0, len(pending), FEATURE_BATCH):
            chunk = pending[start : start + FEATURE_BATCH]
            images = [decode_image(p.data, max_pixels=self.max_pixels)[0] for p in chunk]
            image_codes.append(self._image_codes(images))
            progress(start + len(chunk), len(pending))
        return self._commit(pending, image_codes, on_conflict=on_conflict)

    def _image_codes(self, images: list[Image.Image]) -> np.ndarray:
        """(n, words) packed codes of decoded images (dropped right after by the caller)."""
        return self.encoder.encode_image_features(self.encoder.image_features(images))

    def _commit(
        self, pending: Sequence[Pending], image_codes: list[np.ndarray], *, on_conflict: OnConflict
    ) -> int:
        text_codes, _ = self.encoder.encode_texts([p.text for p in pending])
        empty = np.empty((0, n_words(self.encoder.n_bits)), np.uint64)
        batch = NewItems(
            ids=[p.id for p in pending],
            texts=[p.text for p in pending],
            images=[""] * len(pending),
            image_codes=np.concatenate(image_codes) if image_codes else empty,
            text_codes=text_codes,
            fields=[p.fields for p in pending],
            image_data=[(p.data, p.extension) for p in pending],
        )
        return self.store.add(batch, on_conflict=on_conflict)

    def add_dataset(
        self, data: PairDataset, progress: Progress, *, on_conflict: OnConflict
    ) -> DatasetOutcome:
        """Stream a dataset of image files into the store, CHUNK pairs at a time.

        Each image file is read and decoded once: FEATURE_BATCH decoded images at a time go
        through the backbone and are dropped; a chunk's raw bytes wait for its commit.
        """
        if data.image_paths is None or data.texts is None:
            raise InputError(f"expected raw images and texts in {data.name}, got features")
        paths, texts = data.image_paths, data.texts
        ids = dataset_ids(data)
        skipped = [f"{r.pair}: {r.reason}" for r in data.rejected]
        todo = list(range(len(ids)))
        if on_conflict == "error":
            present = self.store.existing(ids)
            skipped += [f"{ids[i]}: already indexed" for i in todo if ids[i] in present]
            todo = [i for i in todo if ids[i] not in present]
        extra = data.extra
        added, commit = 0, self.store.view().commit
        progress(0, len(todo))
        for start in range(0, len(todo), CHUNK):
            pending: list[Pending] = []
            image_codes: list[np.ndarray] = []
            chunk = todo[start : start + CHUNK]
            for group_start in range(0, len(chunk), FEATURE_BATCH):
                images = []
                for i in chunk[group_start : group_start + FEATURE_BATCH]:
                    try:
                        raw = paths[i].read_bytes()
                        image, extension = decode_image(raw, max_pixels=self.max_pixels)
                    except (InputError, OSError) as err:
                        skipped.append(f"{ids[i]}: {paths[i].name}: {err}")
                        continue
                    images.append(image)
                    fields = dict(extra[i]) if extra is not None else {}
                    pending.append(Pending(ids[i], texts[i], raw, extension, fields))
                if images:
                    image_codes.append(self._image_codes(images))
                progress(start + min(group_start + FEATURE_BATCH, len(chunk)), len(todo))
            if pending:
                commit = self._commit(pending, image_codes, on_conflict=on_conflict)
                added += len(pending)
        logger.info("dataset %s: %d added, %d skipped", data.name, added, len(skipped))
        return DatasetOutcome(added, skipped, commit)


def _image_bytes(item: BuildItem, data_dir: Path | None, max_image_bytes: int) -> bytes:
    if item.image_base64 is not None:
        try:
            data = base64.b64decode(item.image_base64, validate=True)
        except (binascii.Error, ValueError) as err:
            raise InputError(f"expected base64 image bytes, got: {err}") from err
    else:
        if data_dir is None:
            raise InputError("expected image_base64: image_path needs CMH_SERVER_DATA_DIR")
        path = inside(data_dir, item.image_path or "")
        if not path.is_file():
            raise InputError(f"expected an image file at {item.image_path!r}, found none")
        data = path.read_bytes()
    if len(data) > max_image_bytes:
        raise InputError(f"expected an image of at most {max_image_bytes} bytes, got {len(data)}")
    return data
