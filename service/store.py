"""What the service serves, on disk and in memory: index generations swapped atomically.

Layout under the artifacts folder:
  model.pt                      the AUCMH checkpoint
  index/CURRENT                 the name of the generation being served (replaced atomically)
  index/<generation>/           image.hidx, text.hidx, items.jsonl, manifest.json
  images/<sha256>.<ext>         images of items added through the API (content-addressed)

A generation is written in full into a fresh folder (each file fsynced) before CURRENT is
replaced with os.replace, so a crash at any point leaves the previous generation served and intact.
In memory a `Snapshot` holds one generation; requests read `app.state.snapshot` once and use that
object throughout, so a swap never tears a result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.errors import InputError
from indexes.hamming import HammingIndex
from indexes.milvus import MilvusHammingIndex

logger = logging.getLogger(__name__)

SearchIndex = HammingIndex | MilvusHammingIndex  # the backends a Snapshot may serve from
CHECKPOINT_NAME = "model.pt"
INDEX_DIR = "index"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class Item:
    """One indexed pair's metadata: its caption and its stored image (relative to artifacts)."""

    id: int
    text: str
    image: str


@dataclass(frozen=True)
class Manifest:
    """What a generation's codes were made with; must match the served checkpoint."""

    n_bits: int
    image_backbone: str
    vocabulary_sha256: str
    checkpoint_sha256: str
    created: float


@dataclass(frozen=True)
class Snapshot:
    """One served generation: both indexes (same ids) and every item's metadata."""

    generation: str
    manifest: Manifest
    image_index: SearchIndex
    text_index: SearchIndex
    items: dict[int, Item]


def manifest_for(
    checkpoint_path: Path, *, n_bits: int, backbone: str, vocabulary: list[str]
) -> Manifest:
    """The manifest of codes made by the checkpoint at checkpoint_path."""
    return Manifest(
        n_bits=n_bits,
        image_backbone=backbone,
        vocabulary_sha256=vocabulary_digest(vocabulary),
        checkpoint_sha256=file_digest(checkpoint_path),
        created=time.time(),
    )


def vocabulary_digest(vocabulary: list[str] | None) -> str:
    """SHA-256 of the vocabulary in column order (what text codes depend on)."""
    return hashlib.sha256("\n".join(vocabulary or []).encode()).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_generation(
    artifacts: Path,
    *,
    manifest: Manifest,
    image_index: HammingIndex,
    text_index: HammingIndex,
    items: dict[int, Item],
) -> Snapshot:
    """Persist a new generation and make it current; returns it as a Snapshot."""
    if not np.array_equal(np.sort(image_index.ids), np.sort(text_index.ids)):
        raise InputError("expected the image and text indexes to hold the same ids")
    root = artifacts / INDEX_DIR
    root.mkdir(parents=True, exist_ok=True)
    generation = f"gen-{time.time_ns()}"
    tmp = root / f".{generation}.partial"
    tmp.mkdir()
    image_index.save(tmp / "image.hidx")
    text_index.save(tmp / "text.hidx")
    lines = [json.dumps(asdict(items[i]), ensure_ascii=False) for i in image_index.ids.tolist()]
    _fsync_write(tmp / "items.jsonl", ("\n".join(lines) + "\n").encode())
    _fsync_write(tmp / "manifest.json", json.dumps(asdict(manifest), indent=2).encode())
    os.replace(tmp, root / generation)
    _fsync_dir(root)
    _fsync_write(root / "CURRENT.tmp", generation.encode())
    os.replace(root / "CURRENT.tmp", root / "CURRENT")
    _fsync_dir(root)
    logger.info("index generation %s written: %d items", generation, len(image_index))
    _remove_old_generations(root, keep={generation})
    return Snapshot(generation, manifest, image_index, text_index, dict(items))


def _remove_old_generations(root: Path, keep: set[str]) -> None:
    """Drop generations that are neither current nor the newest previous one (kept for rollback)."""
    gens = sorted(p for p in root.glob("gen-*") if p.is_dir() and p.name not in keep)
    for old in gens[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob(".gen-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def current_generation(artifacts: Path) -> str | None:
    """The name in index/CURRENT, or None when no index was ever built."""
    pointer = artifacts / INDEX_DIR / "CURRENT"
    return pointer.read_text().strip() if pointer.is_file() else None


def load_snapshot(artifacts: Path, *, mmap: bool = True) -> Snapshot:
    """Load the current generation; InputError saying what is missing or inconsistent."""
    generation = current_generation(artifacts)
    if generation is None:
        raise InputError(f"expected an index in {artifacts / INDEX_DIR} (CURRENT), found none")
    folder = artifacts / INDEX_DIR / generation
    for name in ("image.hidx", "text.hidx", "items.jsonl", "manifest.json"):
        if not (folder / name).is_file():
            raise InputError(f"expected {folder / name} (generation {generation}), it is missing")
    try:
        manifest = Manifest(**json.loads((folder / "manifest.json").read_text()))
    except (ValueError, TypeError) as err:
        raise InputError(f"expected a manifest in {folder / 'manifest.json'}, got: {err}") from err
    image_index = HammingIndex.load(folder / "image.hidx", mmap=mmap)
    text_index = HammingIndex.load(folder / "text.hidx", mmap=mmap)
    items: dict[int, Item] = {}
    for number, line in enumerate((folder / "items.jsonl").read_text("utf-8").splitlines(), 1):
        if line.strip():
            try:
                item = Item(**json.loads(line))
            except (ValueError, TypeError) as err:
                raise InputError(f"items.jsonl line {number} in {folder}: {err}") from err
            items[item.id] = item
    for name, index in (("image", image_index), ("text", text_index)):
        if index.n_bits != manifest.n_bits:
            raise InputError(f"{name} index has {index.n_bits} bits, manifest {manifest.n_bits}")
        if len(index) != len(items) or not all(i in items for i in index.ids.tolist()):
            raise InputError(f"{name} index of {folder} does not hold exactly the listed items")
    logger.info("loaded index generation %s: %d items", generation, len(items))
    return Snapshot(generation, manifest, image_index, text_index, items)


def store_image(artifacts: Path, data: bytes, extension: str) -> str:
    """Save image bytes content-addressed under images/; returns the path relative to artifacts."""
    digest = hashlib.sha256(data).hexdigest()
    relative = f"{IMAGES_DIR}/{digest}.{extension}"
    target = artifacts / relative
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        _fsync_write(tmp, data)
        os.replace(tmp, target)
    return relative
