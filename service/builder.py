"""Changing what is served: validate a batch, encode it, write a new generation, swap it in.

A build succeeds or fails as a whole: every item is validated first (ids, texts, images decoded
under the size and pixel limits), and any failure leaves the served and stored indexes exactly as
they were. Changes are serialised by one lock; searches never wait for it, because they read the
current Snapshot object, which a change replaces in one assignment after the new generation is on
disk.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import InputError
from indexes.codes import n_words
from indexes.hamming import HammingIndex
from models.datasets import load_dataset
from models.image_features import to_rgb
from service.encoder import Encoder
from service.milvus_serving import MilvusMirror, in_memory
from service.schemas import BuildItem, DatasetSource, ErrorItem
from service.store import Item, Snapshot, store_image, write_generation

logger = logging.getLogger(__name__)

EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "TIFF": "tif",
}
FEATURE_BATCH = 32


class BuildFailed(InputError):
    """A batch that failed validation: the message, and one entry per bad item."""

    def __init__(self, message: str, errors: list[ErrorItem]) -> None:
        super().__init__(message)
        self.errors = errors


def decode_image(data: bytes, *, max_pixels: int) -> tuple[Image.Image, str]:
    """(RGB image, file extension) from image file bytes; InputError saying why it cannot be."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            width, height = im.size
            if width * height > max_pixels:  # checked before decoding: a bomb never expands
                raise InputError(
                    f"expected at most {max_pixels} pixels, got {width}x{height} = {width * height}"
                )
            if fmt not in EXTENSIONS:
                raise InputError(f"expected one of {', '.join(EXTENSIONS)} images, got {fmt!r}")
            im.load()
            return to_rgb(im), EXTENSIONS[fmt]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"could not decode image: {err}") from err
    except Image.DecompressionBombError as err:
        raise InputError(f"expected a reasonably sized image, got: {err}") from err


def inside(base: Path, relative: str) -> Path:
    """base / relative, refusing anything that resolves outside base (.., absolute, symlinks)."""
    target = (base / relative).resolve()
    if not target.is_relative_to(base.resolve()):
        raise InputError(f"expected a path inside the server data folder, got {relative!r}")
    return target


@dataclass
class Pending:
    """A validated item: its id, text and image bytes (decoded again in batches when encoded)."""

    id: int
    text: str
    data: bytes
    extension: str
    stored_as: str | None = None  # an image already inside the artifacts folder


class Served:
    """The served snapshot plus the one lock that serialises every change to it."""

    def __init__(
        self,
        *,
        artifacts: Path,
        encoder: Encoder,
        snapshot: Snapshot,
        max_pixels: int,
        mirror: MilvusMirror | None = None,
    ) -> None:
        self.artifacts = artifacts
        self.mirror = mirror  # serves each new generation from Milvus when configured
        self.encoder = encoder
        self.snapshot = snapshot  # replaced, never mutated: readers take it once per request
        self.max_pixels = max_pixels
        self.lock = threading.Lock()

    def validate_items(
        self, items: list[BuildItem], *, data_dir: Path | None, max_image_bytes: int
    ) -> list[Pending]:
        """Check every item; raises BuildFailed listing each bad one, else the pending items."""
        errors: list[ErrorItem] = []
        pending: list[Pending] = []
        seen: set[int] = set()
        present = self.snapshot.image_index.contains(np.asarray([i.id for i in items], np.int64))
        for index, item in enumerate(items):
            try:
                if item.id in seen:
                    raise InputError(f"expected unique ids, got id {item.id} twice in this batch")
                seen.add(item.id)
                if present[index]:
                    raise InputError(f"expected a new id, got {item.id}: already indexed")
                data = self._image_bytes(item, data_dir, max_image_bytes)
                _, extension = decode_image(data, max_pixels=self.max_pixels)
                pending.append(Pending(item.id, item.text, data, extension))
            except InputError as err:
                errors.append(ErrorItem(index=index, id=item.id, reason=str(err)))
        if errors:
            raise BuildFailed(f"{len(errors)} of {len(items)} items are invalid", errors)
        return pending

    @staticmethod
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
            raise InputError(
                f"expected an image of at most {max_image_bytes} bytes, got {len(data)}"
            )
        return data

    def validate_dataset(
        self, source: DatasetSource, *, data_dir: Path | None, max_items: int
    ) -> tuple[list[Pending], list[str]]:
        """Load a dataset root as pending items; (items, loader rejections as 'pair: reason')."""
        if data_dir is None:
            raise InputError("expected CMH_SERVER_DATA_DIR to be set for dataset builds")
        data = load_dataset(source.name, inside(data_dir, source.root))
        if data.image_paths is None or data.texts is None:
            raise InputError(f"expected raw images and texts in {source.name}, got features")
        if len(data) > max_items:
            raise InputError(f"expected at most {max_items} items per build, got {len(data)}")
        errors, pending = [], []
        ids = []
        for index, (pair_id, path, text) in enumerate(
            zip(data.ids, data.image_paths, data.texts, strict=True)
        ):
            if not pair_id.isdigit():
                errors.append(
                    ErrorItem(index=index, reason=f"expected an integer id, got {pair_id!r}")
                )
                continue
            ids.append(int(pair_id))
            pending.append(Pending(int(pair_id), text, path.read_bytes(), ""))
        present = self.snapshot.image_index.contains(np.asarray(ids, np.int64))
        for index, (p, dup) in enumerate(zip(pending, present, strict=True)):
            if dup:
                errors.append(ErrorItem(index=index, id=p.id, reason="already indexed"))
            else:
                try:
                    _, p.extension = decode_image(p.data, max_pixels=self.max_pixels)
                except InputError as err:
                    errors.append(ErrorItem(index=index, id=p.id, reason=str(err)))
        if errors:
            raise BuildFailed(f"{len(errors)} of {len(data)} dataset items are invalid", errors)
        return pending, [f"{r.pair}: {r.reason}" for r in data.rejected]

    def add(self, pending: list[Pending], progress: Callable[[int, int], None]) -> Snapshot:
        """Encode pending items, persist a new generation with them, and serve it."""
        codes_image = np.empty((len(pending), n_words(self.encoder.n_bits)), np.uint64)
        for start in range(0, len(pending), FEATURE_BATCH):
            chunk = pending[start : start + FEATURE_BATCH]
            images = [decode_image(p.data, max_pixels=self.max_pixels)[0] for p in chunk]
            feats = self.encoder.image_features(images)
            codes_image[start : start + len(chunk)] = self.encoder.encode_image_features(feats)
            progress(start + len(chunk), len(pending))
        codes_text, _ = self.encoder.encode_texts([p.text for p in pending])
        ids = np.asarray([p.id for p in pending], dtype=np.int64)
        with self.lock:
            current = self.snapshot
            image_index, text_index = in_memory(current.image_index), in_memory(current.text_index)
            image_index.add(codes_image, ids)  # InputError if an id arrived meanwhile
            text_index.add(codes_text, ids)
            items = dict(current.items)
            for p in pending:
                image = p.stored_as or store_image(self.artifacts, p.data, p.extension)
                items[p.id] = Item(p.id, p.text, image)
            return self._publish(current, image_index, text_index, items)

    def delete(self, item_id: int) -> tuple[bool, Snapshot]:
        """Remove one id from both indexes (persisted, then served); (was it there, snapshot)."""
        with self.lock:
            current = self.snapshot
            if item_id not in current.items:
                return False, current
            image_index, text_index = in_memory(current.image_index), in_memory(current.text_index)
            ids = np.asarray([item_id], dtype=np.int64)
            image_index.remove(ids)
            text_index.remove(ids)
            items = {k: v for k, v in current.items.items() if k != item_id}
            return True, self._publish(current, image_index, text_index, items)

    def _publish(
        self,
        current: Snapshot,
        image_index: HammingIndex,
        text_index: HammingIndex,
        items: dict[int, Item],
    ) -> Snapshot:
        start = time.perf_counter()
        snapshot = write_generation(
            self.artifacts,
            manifest=replace(current.manifest, created=time.time()),
            image_index=image_index,
            text_index=text_index,
            items=items,
        )
        if self.mirror is not None:
            snapshot = self.mirror.serve(snapshot)
        self.snapshot = snapshot
        seconds = time.perf_counter() - start
        logger.info("serving %s (%d items, %.2f s)", snapshot.generation, len(items), seconds)
        return snapshot
