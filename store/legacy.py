"""Migration of the generation folders that served before the store (index/CURRENT).

The old layout: index/CURRENT names a generation folder index/<gen>/ with image.hidx and
text.hidx (Hamming index files, INDEX_LAYOUT below, CRC-checked), items.jsonl ({"id", "text",
"image"} per line, in index order) and manifest.json. `migrate` reads the current generation,
checks it whole, adds its items to a new store in index order (so ties keep their order) and
renames index/ to index.migrated/, which the user may delete. A crash before the rename leaves
index/ in place and a half-made store, which the next migration removes and makes again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from common.errors import InputError
from common.fsio import fsync_dir
from store import sections
from store.manifest import Manifest, check_manifest
from store.rows import NewItems
from store.store import STORE_DIR, Store

logger = logging.getLogger(__name__)

LEGACY_DIR = "index"
MIGRATED_DIR = "index.migrated"
# The earlier design's Hamming index files, kept here for this migration alone: nothing writes
# them any more, and nothing else reads them.
INDEX_LAYOUT = sections.Layout(
    kind="Hamming index file",
    magic=b"CMHHAMIX",
    version=1,
    header_size=64,
    sections=(sections.Section("ids", codes=False), sections.Section("codes", codes=True)),
)


def read_index(path: Path) -> tuple[int, np.ndarray, np.ndarray]:
    """A Hamming index file's (n_bits, ids (n,) int64, codes (n, words) uint64), all checked."""
    header = sections.read_header(path, INDEX_LAYOUT)
    ids, codes = sections.read_sections(path, INDEX_LAYOUT, header, mmap=False)
    return header.n_bits, ids, codes


def has_generations(artifacts: Path) -> bool:
    """Whether artifacts holds a generation-format index."""
    return (artifacts / LEGACY_DIR / "CURRENT").is_file()


def migrate(artifacts: Path, *, expected: Manifest | None = None) -> tuple[Store, str]:
    """Move the current generation into a new store; (store, one line saying what was done)."""
    root = artifacts / LEGACY_DIR
    try:
        generation = (root / "CURRENT").read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"expected a generation name in {root / 'CURRENT'}, got: {err}") from err
    folder = root / generation
    if not generation.startswith("gen-") or "/" in generation or not folder.is_dir():
        raise InputError(
            f"expected {root / 'CURRENT'} to name a generation folder, got {generation!r}"
        )
    try:
        found = json.loads((folder / "manifest.json").read_text("utf-8"))
        manifest = Manifest(**found)
    except (OSError, ValueError, TypeError) as err:
        raise InputError(f"expected a manifest in {folder / 'manifest.json'}, got: {err}") from err
    if expected is not None:
        check_manifest(manifest, expected)
    image_bits, ids_found, image_codes = read_index(folder / "image.hidx")
    text_bits, text_ids, text_codes = read_index(folder / "text.hidx")
    if image_bits != manifest.n_bits or text_bits != manifest.n_bits:
        raise InputError(
            f"expected {manifest.n_bits}-bit codes in {folder} (its manifest), got "
            f"{image_bits} and {text_bits} bits"
        )
    items: dict[int, dict[str, object]] = {}
    for number, line in enumerate((folder / "items.jsonl").read_text("utf-8").splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
                items[int(record["id"])] = record
            except (ValueError, TypeError, KeyError) as err:
                raise InputError(f"items.jsonl line {number} in {folder}: {err}") from err
    ids = ids_found.tolist()
    if text_ids.tolist() != ids or sorted(items) != sorted(ids):
        raise InputError(f"expected both indexes and items.jsonl of {folder} to list the same ids")
    if (artifacts / STORE_DIR).exists():  # a migration that crashed part-way
        shutil.rmtree(artifacts / STORE_DIR)
    store = Store.create(artifacts, manifest)
    store.add(
        NewItems(
            ids=ids,
            texts=[str(items[i]["text"]) for i in ids],
            images=[str(items[i]["image"]) for i in ids],
            image_codes=image_codes,
            text_codes=text_codes,
        )
    )
    os.replace(root, artifacts / MIGRATED_DIR)
    fsync_dir(artifacts)
    line = (
        f"migrated index generation {generation} ({len(ids)} items) into {artifacts / STORE_DIR}; "
        f"the old folder is now {artifacts / MIGRATED_DIR} and may be deleted"
    )
    logger.warning(line)
    return store, line
