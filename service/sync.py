"""One store made to hold another's items with its own model's codes: reindex, switch, rollback.

One mechanism does all of it: `sync(source, target)` makes a target store hold exactly the
source's items (same ids, captions, images, fields and added times) with codes of the target's
model. It keeps no state: each pass compares the two stores' rows in SQLite (an item is up to
date when the target has its id with the same caption, image, fields and added time), copies
what differs in the source's insertion order and deletes what the source no longer has. So:
- `cmh index reindex` is sync into a new, empty version, pass after pass while the server keeps
  writing to the served one; killed at any moment, running it again resumes (the items already
  copied compare equal and are skipped), and the served version was only ever read;
- the switch (POST /v1/admin/reload, `cmh index switch`) runs one last pass while it holds every
  writer of the served store, so a write acknowledged before the switch is in the new version,
  then names the new version in CURRENT and retires the old store: a write that reaches it later
  is refused (StoreRetired) and made again on the new one;
- a rollback is the same switch to an older version: the items written since are re-encoded
  with the older model, so nothing acknowledged is lost either way.

Memory is bounded by one batch (BATCH items, their image features and codes) whatever the size
of the store. Image features come from the feature cache (models/features/content_cache.py)
when it has them: a reindex after `cmh train --from-store` runs no backbone over the images
that training saw. Images are hard-linked from the source version (store/rows.put_image).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import InputError, IntegrityError
from models.features.content_cache import (
    FeatureCache,
    features_by_content,
)
from models.features.image import encode_images
from service.encoder import Encoder
from store import metadata as md
from store import versions
from store.rows import IMAGES_DIR, KEPT_IMAGE, NewItems
from store.store import DB_NAME, STORE_DIR, Store

logger = logging.getLogger(__name__)

BATCH = 1024  # items read, encoded and committed at a time
# A reindex pass that changes fewer items than this is the last before "ready": the switch's
# own pass, under the writers' lock, then has about this much to do.
SETTLED = 256
MAX_PASSES = 20  # a source written faster than it is copied still ends (the switch catches up)
STAGING_DIR = "staging"  # in the target's store folder: links to the images being copied

# What differs: an item of the source that the target lacks with the same caption, image,
# fields and added time (its id is the target's UNIQUE index: one lookup per source row).
_CHANGED = """
SELECT s.seq FROM main.items s
WHERE s.seq > ? AND s.seq <= ? AND NOT EXISTS (
    SELECT 1 FROM target.items t
    WHERE t.id = s.id AND t.text = s.text AND t.image = s.image AND t.fields = s.fields
      AND t.added = s.added)
ORDER BY s.seq LIMIT ?
"""
_GONE = """
SELECT t.id FROM target.items t
WHERE NOT EXISTS (SELECT 1 FROM main.items s WHERE s.id = t.id)
LIMIT ?
"""

Features = Callable[[list[Path], list[str | None]], np.ndarray]  # image files -> (n, d)


@dataclass(frozen=True)
class SyncCounts:
    """What one sync did."""

    copied: int  # items added or replaced in the target
    deleted: int  # items removed from the target
    seconds: float

    @property
    def changed(self) -> int:
        """Items the pass changed in the target."""
        return self.copied + self.deleted


class Recoder:
    """Items of a store to codes of one model: captions through its vectorizer, images through
    `features` (the feature cache, or the backbone directly)."""

    def __init__(self, encoder: Encoder, features: Features) -> None:
        self.encoder = encoder
        self.features = features

    def codes(self, items: list[md.Item], paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        """(image codes, text codes), packed, of items whose image files are at `paths`."""
        digests: list[str | None] = []
        for item in items:
            match = KEPT_IMAGE.fullmatch(item.image)
            digests.append(match.group(1) if match else None)
        features = self.features(paths, digests)
        image_codes = self.encoder.encode_image_features(features)
        text_codes, _ = self.encoder.encode_texts([item.text for item in items])
        return image_codes, text_codes


def backbone_features(encoder: Encoder) -> Features:
    """Image files through the encoder's own backbone (the server's catch-up: a few items)."""
    return lambda paths, _digests: encode_images(encoder.backbone, paths)


def cached_features(encoder: Encoder, cache: FeatureCache) -> Features:
    """Image files through the feature cache, the backbone only for images it has not seen."""
    name = encoder.backbone.name
    return lambda paths, digests: (
        features_by_content(
            paths, cache, backbone=name, digests=digests, loaded=encoder.backbone
        ).features
    )


def _compare(source: Path, target: Store) -> sqlite3.Connection:
    """A read-only connection to the source store's database with the target's attached."""
    source_db = source / STORE_DIR / DB_NAME
    if not source_db.is_file():
        raise InputError(f"expected a store at {source_db}, found none")
    conn = md.connect_read_only(source_db)
    target_db = (target.root / DB_NAME).resolve().as_uri()
    conn.execute("ATTACH DATABASE ? AS target", (f"{target_db}?mode=ro",))
    return conn


def sync(
    source: Path,
    target: Store,
    recoder: Recoder,
    *,
    batch: int = BATCH,
    progress: Callable[[int], None] | None = None,
) -> SyncCounts:
    """One pass making `target` hold the items of the store in version folder `source`, with
    the recoder's codes (see the module's docstring); progress(n) after each n items copied.

    Items the source gains during the pass may be left for the next one: a pass copies up to
    the last seq the source had when it began.
    """
    start = time.perf_counter()
    for stale in (target.root / STAGING_DIR).glob("*"):  # links left by a pass that was killed
        stale.unlink(missing_ok=True)
    conn = _compare(source, target)
    copied = deleted = 0
    where = source / STORE_DIR / DB_NAME
    try:
        top = conn.execute("SELECT COALESCE(MAX(seq), -1) FROM main.items").fetchone()[0]
        after = -1
        while True:
            seqs = [s for (s,) in conn.execute(_CHANGED, (after, top, batch))]
            if not seqs:
                break
            after = seqs[-1]
            rows = md.rows_by_seq(conn, seqs, where)
            read = [(s, rows[s]) for s in seqs if s in rows]  # one deleted meanwhile: next pass
            if read:
                n = _copy(read, source, target, recoder, conn)
                copied += n
                if progress is not None:
                    progress(n)
        while True:
            gone = [item_id for (item_id,) in conn.execute(_GONE, (batch,))]
            if not gone:
                break
            deleted += len(target.delete(gone).ids)
    finally:
        conn.close()
    return SyncCounts(copied, deleted, time.perf_counter() - start)


def _copy(
    read: list[tuple[int, md.Item]],
    source: Path,
    target: Store,
    recoder: Recoder,
    conn: sqlite3.Connection,
) -> int:
    """Encode items (seq, item) of the source and add them to the target, replacing the ids it
    has; how many.

    The served source keeps changing under a reindex: an item deleted since it was read takes
    its image file with it. So each image is first hard-linked into the target's staging folder
    (a link keeps the file's bytes whatever the source does next), and read from there; an item
    whose image is already gone is left out, its row gone too (the next pass sees what the
    source holds then). An image missing from an item still there is an IntegrityError.
    """
    staging = target.root / STAGING_DIR
    staging.mkdir(exist_ok=True)
    items: list[md.Item] = []
    paths: list[Path] = []
    staged: list[Path] = []
    try:
        for seq, item in read:
            path = source / item.image
            if item.image.startswith(f"{IMAGES_DIR}/"):
                path = staging / path.name
                if not _stage(source / item.image, path):
                    if conn.execute("SELECT 1 FROM main.items WHERE seq = ?", (seq,)).fetchone():
                        raise IntegrityError(
                            f"expected the image {source / item.image} of item {item.id!r}, "
                            "got none"
                        )
                    continue  # deleted since it was read
                staged.append(path)
            items.append(item)
            paths.append(path)
        if items:
            _add(items, paths, target, recoder)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
    return len(items)


def _stage(image: Path, link: Path) -> bool:
    """Hard-link (or copy) a source image to `link`; False when it is gone."""
    try:
        os.link(image, link)
    except FileExistsError:
        return True
    except FileNotFoundError:
        return False
    except OSError:  # another file system: a copy (an open file keeps its bytes)
        try:
            shutil.copyfile(image, link)
        except FileNotFoundError:
            return False
    return True


def _add(items: list[md.Item], paths: list[Path], target: Store, recoder: Recoder) -> None:
    """Encode items (their images at `paths`) and add them to the target, replacing the ids it
    has; kept images are linked from `paths`, under the target's writer lock."""
    image_codes, text_codes = recoder.codes(items, paths)
    target.add(
        NewItems(
            ids=[item.id for item in items],
            texts=[item.text for item in items],
            images=[item.image for item in items],
            image_codes=image_codes,
            text_codes=text_codes,
            fields=[item.fields for item in items],
            image_files=[
                path if item.image.startswith(f"{IMAGES_DIR}/") else None
                for item, path in zip(items, paths, strict=True)
            ],
            added=[item.added for item in items],
        ),
        on_conflict="replace",
    )


@dataclass(frozen=True)
class Switched:
    """What a switch did."""

    version: str  # now served
    previous: str  # served before
    caught_up: SyncCounts  # the last pass, under the writers' lock
    seconds: float  # the whole switch, the loading of the new version included


def switch_stores(
    artifacts: Path,
    *,
    old: Store,
    old_dir: Path,
    new: Store,
    new_name: str,
    recoder: Recoder,
) -> SyncCounts:
    """The switch proper, with both versions open: the new store takes writes again (a
    rollback's target was retired), then, holding every writer of the old store, the last pass
    copies what was written since the reindex, CURRENT names the new version and the old store
    is retired. A failure before CURRENT is written leaves the old version served as it was."""
    new.reinstate()
    with old.switching() as retire:
        counts = sync(old_dir, new, recoder)
        retire(True)  # under the lock: no write of any process lands between this and CURRENT
        try:
            versions.set_current(artifacts, new_name)
        except BaseException:
            retire(False)
            raise
    logger.info(
        "switched %s to %s: the last pass copied %d and deleted %d items in %.3f s",
        artifacts, new_name, counts.copied, counts.deleted, counts.seconds,
    )  # fmt: skip
    return counts
