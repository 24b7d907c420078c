"""Image features kept per image content: computed once per image, whatever its file or dataset.

The cache is one SQLite file (`cmh train --from-store A` keeps it in A/feature-cache/): one row
per (backbone, SHA-256 of the image bytes) holding that image's float32 features and when they
were last used. A run reads the features of every image it has seen before and runs the backbone
over the others alone, committing them every CHUNK images, so an interrupted run keeps what it
computed. The file is bounded by `max_bytes` of features: past it, after a run has added its
own, the least recently used rows are deleted until the rest fit (a run that needs more than the
bound keeps only its most recently computed part for the next one); SQLite reuses the pages freed,
so the file stays near the bound and does not shrink. The backbone's name and a digest of its
weights file (when one is given) make up the key with the image digest: new weights, new
features. A cache holding features of another width than the backbone gives is refused in one
line (it can be deleted: it is only a cache).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.errors import InputError
from common.fsio import file_sha256
from models.features.image import Backbone, encode_images, load_backbone

logger = logging.getLogger(__name__)

CACHE_NAME = "features.sqlite"
# An artifacts folder's cache, shared by all its versions: ARTIFACTS/feature-cache/features.sqlite
STORE_CACHE_DIR = "feature-cache"
DEFAULT_MAX_BYTES = 4 << 30  # 4 GiB of features: 800,000 images at EfficientNet-Lite's 1280-d
CHUNK = 1024  # images per backbone call between commits
SQL_BATCH = 500  # values per `IN (...)` list
SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    backbone TEXT NOT NULL,       -- the backbone's name, and its weights file's digest if any
    sha256 TEXT NOT NULL,         -- of the image file's bytes
    vector BLOB NOT NULL,         -- float32 little-endian features
    used REAL NOT NULL,           -- last read or written (seconds since the epoch)
    PRIMARY KEY (backbone, sha256)
) WITHOUT ROWID
"""


@dataclass(frozen=True)
class CachedFeatures:
    """Features of a list of image files, row i for file i, and where they came from."""

    features: np.ndarray  # (n, d) float32
    encoded: int  # distinct images the backbone ran over in this call
    cached: int  # distinct images read from the cache


class FeatureCache:
    """One cache file's connection (state: the connection and the bound)."""

    def __init__(self, folder: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / CACHE_NAME
        self.max_bytes = max_bytes
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # a cache: a crash may lose the last rows
        self._conn.execute(SCHEMA)

    def dim(self, backbone: str) -> int:
        """The feature width held for this backbone (0: none held)."""
        sql = "SELECT length(vector) FROM features WHERE backbone = ? LIMIT 1"
        row = self._conn.execute(sql, (backbone,)).fetchone()
        return 0 if row is None else int(row[0]) // 4

    def get(self, backbone: str, digests: Sequence[str], dim: int) -> dict[str, np.ndarray]:
        """The cached (dim,) features of those digests that have them; marks them used."""
        found: dict[str, np.ndarray] = {}
        now = time.time()
        for start in range(0, len(digests), SQL_BATCH):
            part = list(digests[start : start + SQL_BATCH])
            marks = ", ".join("?" * len(part))
            sql = f"SELECT sha256, vector FROM features WHERE backbone = ? AND sha256 IN ({marks})"
            for sha, blob in self._conn.execute(sql, (backbone, *part)):
                if len(blob) == 4 * dim:
                    found[sha] = np.frombuffer(blob, dtype="<f4").astype(np.float32)
            self._conn.execute(
                f"UPDATE features SET used = ? WHERE backbone = ? AND sha256 IN ({marks})",
                (now, backbone, *part),
            )
        return found

    def put(self, backbone: str, digests: Sequence[str], features: np.ndarray) -> None:
        """Keep (n, d) features of n digests, in one transaction."""
        now = time.time()
        rows = [
            (backbone, sha, np.ascontiguousarray(row, dtype="<f4").tobytes(), now)
            for sha, row in zip(digests, features, strict=True)
        ]
        self._conn.execute("BEGIN IMMEDIATE")
        self._conn.executemany("INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?)", rows)
        self._conn.execute("COMMIT")

    def size_bytes(self) -> int:
        """Bytes of features held."""
        total = self._conn.execute("SELECT SUM(length(vector)) FROM features").fetchone()[0]
        return int(total or 0)

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def evict(self) -> int:
        """Delete least recently used rows until at most max_bytes of features remain; how many."""
        excess = self.size_bytes() - self.max_bytes
        if excess <= 0:
            return 0
        gone, freed = [], 0
        sql = "SELECT backbone, sha256, length(vector) FROM features ORDER BY used, sha256"
        oldest = self._conn.execute(sql)
        for backbone, sha, size in oldest:
            if freed >= excess:
                break
            gone.append((backbone, sha))
            freed += int(size)
        oldest.close()
        self._conn.execute("BEGIN IMMEDIATE")
        self._conn.executemany("DELETE FROM features WHERE backbone = ? AND sha256 = ?", gone)
        self._conn.execute("COMMIT")
        logger.info("feature cache %s: evicted %d least recently used images", self.path, len(gone))
        return len(gone)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def backbone_key(backbone: str, weights: Path | None) -> str:
    """What the features depend on besides the image: the backbone, and its weights file."""
    return backbone if weights is None else f"{backbone}:{file_sha256(weights)[:16]}"


def features_by_content(
    paths: Sequence[Path],
    cache: FeatureCache,
    *,
    backbone: str,
    weights: Path | None = None,
    digests: Sequence[str | None] | None = None,
    progress: bool = False,
    loaded: Backbone | None = None,
) -> CachedFeatures:
    """(n, d) features of n image files: from the cache where their bytes were seen before, the
    backbone over the rest (loaded only if there is any), each distinct content once. `digests`:
    the SHA-256 of each file's bytes where the caller knows it (a content-addressed name), so a
    cached image is not even read; None: read and hash the file. `loaded`: that backbone, already
    loaded by the caller (a reindex calls this once per batch: loading it each time cost a load
    per batch of new images). Memory: the (n, d) result and one chunk of features besides it."""
    if not paths:
        raise InputError("expected at least one image file, got none")
    known = digests if digests is not None else [None] * len(paths)
    rows: dict[str, list[int]] = {}  # digest -> the rows of paths with those bytes
    for i, (path, given) in enumerate(zip(paths, known, strict=True)):
        rows.setdefault(given or file_sha256(path), []).append(i)
    key = backbone_key(backbone, weights)
    out: np.ndarray | None = None  # (n, d) float32, allocated once d is known

    def place(found: dict[str, np.ndarray]) -> None:
        nonlocal out
        for sha, vector in found.items():
            if out is None:
                out = np.empty((len(paths), vector.shape[0]), dtype=np.float32)
            out[rows[sha]] = vector

    distinct = list(rows)
    missing: list[str] = []
    dim = cache.dim(key)
    for start in range(0, len(distinct), CHUNK):
        head = distinct[start : start + CHUNK]
        found = cache.get(key, head, dim) if dim else {}
        place(found)
        missing.extend(sha for sha in head if sha not in found)
    if missing:
        reuse = loaded is not None and loaded.name == backbone and weights is None
        model = loaded if reuse and loaded is not None else load_backbone(backbone, weights=weights)
        try:
            if dim and model.dim != dim:
                raise InputError(
                    f"expected {model.dim}-d features of {key} in {cache.path}, got {dim}-d: "
                    "delete the file to compute them again"
                )
            bar = tqdm(total=len(missing), desc="new images", unit="img", disable=not progress)
            with bar:
                for start in range(0, len(missing), CHUNK):
                    part = missing[start : start + CHUNK]
                    feats = encode_images(model, [paths[rows[sha][0]] for sha in part])
                    cache.put(key, part, feats)
                    place(dict(zip(part, feats, strict=True)))
                    bar.update(len(part))
        finally:
            if model.pool is not None and model is not loaded:
                model.pool.shutdown()
    cache.evict()
    cached = len(distinct) - len(missing)
    logger.info(
        "image features: %d distinct images, %d from the cache %s, %d encoded",
        len(distinct), cached, cache.path, len(missing),
    )  # fmt: skip
    assert out is not None  # every digest was placed, from the cache or the backbone
    return CachedFeatures(out, encoded=len(missing), cached=cached)
