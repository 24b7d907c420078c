"""The live items of a store read from one consistent snapshot, without opening the Store.

What `cmh train --from-store` reads: one read-only SQLite transaction over the items table
(deleted rows are gone from it; tombstones only concern segment files), so it neither takes the
store's flock nor writes anything, and runs beside a serving `cmh serve` as well as on a stopped
store. Each row read is checked against its CRC. On the Milvus backend, `sample_milvus` reads
the same sample from a collection (rows by key; Milvus keeps no snapshot across the reads, so
an item deleted meanwhile is left out).
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import InputError, IntegrityError
from store import metadata as md
from store.manifest import Manifest
from store.rows import IMAGES_DIR
from store.store import DB_NAME, STORE_DIR

MIN_ITEMS = 10  # fewer items than this cannot be split into training and validation
# An image the store keeps: named by the SHA-256 of its bytes (store/rows.py checked_rows).
_KEPT_IMAGE = re.compile(rf"{IMAGES_DIR}/([0-9a-f]{{64}})\.[A-Za-z0-9]+")


@dataclass(frozen=True)
class StoredItems:
    """Live items of a store in seq order: all of them, or a seeded sample."""

    items: list[md.Item]  # (n,) in insertion (seq) order
    n_live: int  # how many live items the store held when read
    manifest: Manifest  # what made the store's codes


def read_items(artifacts: Path, *, max_items: int, seed: int) -> StoredItems:
    """The store's live items, a seeded uniform sample of max_items of them when it holds more
    (the same seed and store give the same sample); InputError when there is no store, no item,
    or max_items < MIN_ITEMS."""
    if max_items < MIN_ITEMS:
        raise InputError(f"expected max_items of at least {MIN_ITEMS}, got {max_items}")
    path = artifacts / STORE_DIR / DB_NAME
    if not path.is_file():
        raise InputError(f"expected a store at {path}, found none")
    try:
        conn = md.connect_read_only(path)
    except sqlite3.Error as err:
        raise InputError(f"expected a readable store database at {path}, got: {err}") from None
    try:
        conn.execute("BEGIN")  # one snapshot for every read below, whatever a server commits
        version = md.get_meta(conn, "schema_version")
        if version not in (*md.UPGRADABLE, str(md.SCHEMA_VERSION)):
            raise InputError(f"expected a cmh store database at {path}, got version {version}")
        manifest = Manifest(**json.loads(md.get_meta(conn, "manifest") or "{}"))
        seqs = np.fromiter((s for (s,) in conn.execute("SELECT seq FROM items")), np.int64)
        if seqs.size == 0:
            raise InputError(f"expected items in the store at {path}, got none")
        n_live = int(seqs.size)
        seqs = sample_seqs(seqs, max_items=max_items, seed=seed)
        rows = md.rows_by_seq(conn, seqs.tolist(), path)
        conn.execute("ROLLBACK")
    except (ValueError, TypeError) as err:  # a manifest that is not one
        raise InputError(f"expected a manifest in {path}, got: {err}") from None
    except sqlite3.DatabaseError as err:
        raise IntegrityError(f"expected a readable store database at {path}, got: {err}") from None
    finally:
        conn.close()
    return StoredItems([rows[int(s)] for s in seqs], n_live, manifest)


def sample_seqs(seqs: np.ndarray, *, max_items: int, seed: int) -> np.ndarray:
    """The sorted seqs of a seeded uniform sample of max_items (all of them when fewer)."""
    seqs = np.sort(seqs)
    if seqs.size > max_items:
        picked = np.random.default_rng(seed).choice(seqs.size, max_items, replace=False)
        seqs = seqs[np.sort(picked)]
    return seqs


def image_sha256(image: str) -> str | None:
    """The SHA-256 of a stored image's bytes, as its content-addressed name says (None: an image
    the store does not keep under images/, whose bytes must be read to know it)."""
    match = _KEPT_IMAGE.fullmatch(image)
    return match.group(1) if match else None
