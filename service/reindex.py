"""Re-encoding a store with another model, and switching the served version (store/versions.py).

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
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import InputError, IntegrityError
from common.fsio import atomic_write
from models.features.content_cache import (
    DEFAULT_MAX_BYTES,
    STORE_CACHE_DIR,
    FeatureCache,
    features_by_content,
)
from models.features.image import encode_images
from service.encoder import Encoder, load_served_model
from store import metadata as md
from store import versions
from store.layout import CHECKPOINT_NAME
from store.manifest import file_digest
from store.rows import IMAGES_DIR, KEPT_IMAGE, NewItems
from store.store import DB_NAME, STORE_DIR, Store

logger = logging.getLogger(__name__)

BATCH = 1024  # items read, encoded and committed at a time
# A reindex pass that changes fewer items than this is the last before "ready": the switch's
# own pass, under the writers' lock, then has about this much to do.
SETTLED = 256
MAX_PASSES = 20  # a source written faster than it is copied still ends (the switch catches up)
RACES = 5  # times a batch is read again after an image went away under it

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

    def codes(self, items: list[md.Item], source: Path) -> tuple[np.ndarray, np.ndarray]:
        """(image codes, text codes), packed, of items stored in the version folder `source`."""
        paths = [source / item.image for item in items]
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
        features_by_content(paths, cache, backbone=name, digests=digests).features
    )


def _compare(source: Path, target: Store) -> sqlite3.Connection:
    """A read-only connection to the source store's database with the target's attached."""
    source_db = source / STORE_DIR / DB_NAME
    if not source_db.is_file():
        raise InputError(f"expected a store at {source_db}, found none")
    conn = sqlite3.connect(
        f"{source_db.resolve().as_uri()}?mode=ro", uri=True, timeout=60, isolation_level=None
    )
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
    has; how many. The served source keeps changing under a reindex: an item deleted (or
    replaced) since it was read takes its image file with it, and is left to the next pass,
    which sees what the source holds then. An image missing from an item still there is an
    IntegrityError."""
    for _ in range(RACES):
        kept = [(seq, item) for seq, item in read if _image_there(source, seq, item, conn)]
        if not kept:
            return 0
        items = [item for _, item in kept]
        try:
            _add(items, source, target, recoder)
            return len(items)
        except (InputError, OSError):
            if all(_image_there(source, seq, item, conn) for seq, item in kept):
                raise  # not a file that went away while it was read: a real error
    raise IntegrityError(f"expected the images of {source} to stay while read, {RACES} times")


def _image_there(source: Path, seq: int, item: md.Item, conn: sqlite3.Connection) -> bool:
    """Whether the item's image file is there; False for an item deleted since it was read."""
    if not item.image.startswith(f"{IMAGES_DIR}/") or (source / item.image).is_file():
        return True
    if conn.execute("SELECT 1 FROM main.items WHERE seq = ?", (seq,)).fetchone() is None:
        return False
    raise IntegrityError(f"expected the image {source / item.image} of item {item.id!r}, got none")


def _add(items: list[md.Item], source: Path, target: Store, recoder: Recoder) -> None:
    """Encode items of the source and add them to the target, replacing the ids it has."""
    image_codes, text_codes = recoder.codes(items, source)
    target.add(
        NewItems(
            ids=[item.id for item in items],
            texts=[item.text for item in items],
            images=[item.image for item in items],
            image_codes=image_codes,
            text_codes=text_codes,
            fields=[item.fields for item in items],
            image_files=[
                source / item.image if item.image.startswith(f"{IMAGES_DIR}/") else None
                for item in items
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


@dataclass(frozen=True)
class Reindexed:
    """What `reindex` made."""

    version: str  # the new version's name
    source: str  # the version it was copied from
    items: int  # items the new version holds
    copied: int  # items encoded and added by this run (a resumed run: the rest)
    passes: int  # sync passes (the last changed fewer than SETTLED items)
    seconds: float
    resumed: bool  # whether an interrupted reindex of the same model was continued

    @property
    def items_per_s(self) -> float:
        """Items encoded and added per second."""
        return self.copied / max(self.seconds, 1e-9)


def reindex(
    artifacts: Path,
    model: Path,
    *,
    device: str = "auto",
    cache_bytes: int = DEFAULT_MAX_BYTES,
    batch: int = BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> Reindexed:
    """Build a new version of the artifacts folder with checkpoint `model`: a copy of the served
    version's items with the new model's codes, in a store beside the served one (which is
    only read, never locked: a server keeps answering and writing). Resumes an interrupted
    reindex of the same model; progress(done, total) as items are copied."""
    started = time.perf_counter()
    if not model.is_file():
        raise InputError(f"expected a checkpoint file at {model}, got none")
    source_name = versions.current_name(artifacts)
    source = versions.version_dir(artifacts, source_name)
    if not Store.exists(source):
        raise InputError(f"expected a store in {source / STORE_DIR} to reindex, found none")
    name, folder, resumed = _target_version(artifacts, source_name, file_digest(model))
    if not (folder / CHECKPOINT_NAME).is_file():
        _copy_model(model, folder)
    served = load_served_model(folder, device=device)
    encoder = Encoder(served.checkpoint, served.backbone, window_ms=0, max_batch=1)
    cache = FeatureCache(artifacts / STORE_CACHE_DIR, max_bytes=cache_bytes)
    store: Store | None = None
    try:
        if Store.exists(folder):
            store = Store.open(folder, expected=served.manifest)
        else:
            store = Store.create(folder, served.manifest)
        recoder = Recoder(encoder, cached_features(encoder, cache))
        copied, passes = 0, 0
        total = _count(source)
        done = len(store)  # a resumed reindex has these already (most of them up to date)

        def step(n: int) -> None:
            nonlocal done
            done = min(done + n, total)
            if progress is not None:
                progress(done, total)

        for passes in range(1, MAX_PASSES + 1):
            counts = sync(source, store, recoder, batch=batch, progress=step)
            copied += counts.copied
            logger.info(
                "reindex %s, pass %d: %d copied, %d deleted in %.1f s",
                name, passes, counts.copied, counts.deleted, counts.seconds,
            )  # fmt: skip
            if counts.changed < SETTLED:
                break
            total = _count(source)
        items = len(store)
    finally:
        if store is not None:
            store.close()
        cache.close()
        encoder.close()
    state = versions.read_state(folder)
    state.update(state="ready", items=items, finished=time.time())
    versions.write_state(folder, state)
    return Reindexed(
        name, source_name, items, copied, passes, time.perf_counter() - started, resumed
    )


def _count(source: Path) -> int:
    """Live items of the store in a version folder (a read, no lock)."""
    db = (source / STORE_DIR / DB_NAME).resolve().as_uri()
    conn = sqlite3.connect(f"{db}?mode=ro", uri=True, timeout=60)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    finally:
        conn.close()


def _target_version(artifacts: Path, source: str, digest: str) -> tuple[str, Path, bool]:
    """(name, folder, resumed) of the version a reindex of the model with this digest builds:
    one newer than the served one, of the same model and source (unfinished: resumed; ready
    and not yet served: brought up to date), or a new one."""
    current = version_number_of(artifacts)
    for version in versions.versions(artifacts):
        if version.number <= current:
            continue
        state = versions.read_state(version.path)
        same = state.get("model_sha256") == digest and state.get("source") == source
        if version.state == "ready":
            if same:  # run again: brought up to date with what the source has now
                return version.name, version.path, True
            continue
        if not state and not (version.path / CHECKPOINT_NAME).exists():
            shutil.rmtree(version.path)  # stopped before its record was written: nothing in it
            continue
        if same:
            return version.name, version.path, True
        raise InputError(
            f"expected no unfinished reindex, found {version.name} (of another model or from "
            f"another version): run it again with its model to finish it, or remove it with "
            f"`cmh index prune --artifacts {artifacts} --version {version.name}`"
        )
    name = versions.next_name(artifacts)
    folder = versions.version_dir(artifacts, name)
    folder.mkdir(parents=True)
    state = {"state": "building", "source": source, "model_sha256": digest, "started": time.time()}
    versions.write_state(folder, state)
    return name, folder, False


def version_number_of(artifacts: Path) -> int:
    """The number of the served version."""
    return versions.version_number(versions.current_name(artifacts))


def _copy_model(model: Path, folder: Path) -> None:
    """The checkpoint into the version's folder (atomic: a crash leaves it whole or absent)."""
    with model.open("rb") as f:
        atomic_write(folder / CHECKPOINT_NAME, lambda out: shutil.copyfileobj(f, out))


def switch_offline(artifacts: Path, name: str | None, *, device: str = "auto") -> Switched:
    """The switch of a folder no server has open (`cmh index switch` / `rollback`): the served
    store is opened alone (InputError if a server holds it: switch through the server then)."""
    started = time.perf_counter()
    current = versions.current_name(artifacts)
    target = versions.switch_target(artifacts, name)
    old_dir = versions.version_dir(artifacts, current)
    old = Store.open(old_dir)
    try:
        served = load_served_model(target.path, device=device)
        encoder = Encoder(served.checkpoint, served.backbone, window_ms=0, max_batch=1)
        try:
            new = Store.open(target.path, expected=served.manifest)
            try:
                recoder = Recoder(encoder, backbone_features(encoder))
                counts = switch_stores(
                    artifacts, old=old, old_dir=old_dir, new=new, new_name=target.name,
                    recoder=recoder,
                )  # fmt: skip
            finally:
                new.close()
        finally:
            encoder.close()
    finally:
        old.close()
    return Switched(target.name, current, counts, time.perf_counter() - started)
