"""`cmh index reindex` and the switch of a folder no server holds (`cmh index switch`,
`rollback`): the drivers around service/sync.py's one mechanism.

A reindex builds version vN+1 of the artifacts folder (store/versions.py) beside the served
one: the checkpoint is copied into its folder, its store is made, and sync passes run until one
changes fewer than SETTLED items; its record then says "ready". It only reads the served store
(no lock), so a server keeps answering and writing meanwhile; killed at any moment, running it
again resumes the same version (same model, same source), and running it again on a ready
version not yet served brings that one up to date. On the Milvus backend (CMH_INDEX_BACKEND=
milvus) the new version is a collection beside the served one (store/milvus_versions.py), filled
by service/sync_milvus.py's passes the same way.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from common.errors import InputError
from common.fsio import atomic_write, file_sha256
from models.features.content_cache import DEFAULT_MAX_BYTES, STORE_CACHE_DIR, FeatureCache
from service.encoder import Encoder, load_served_model
from service.settings import Settings
from service.stores import milvus_pointer, open_item_store, served_version
from service.sync import (
    BATCH,
    MAX_PASSES,
    SETTLED,
    Recoder,
    Switched,
    SyncCounts,
    backbone_features,
    cached_features,
    switch_stores,
    sync,
)
from service.sync_milvus import switch_milvus, sync_milvus
from store import metadata as md
from store import versions
from store.layout import CHECKPOINT_NAME
from store.milvus_store import MilvusStore
from store.milvus_versions import LEASE_S
from store.store import DB_NAME, STORE_DIR, Store

logger = logging.getLogger(__name__)


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
    settings: Settings | None = None,
) -> Reindexed:
    """Build a new version of the artifacts folder with checkpoint `model`: a copy of the served
    version's items with the new model's codes, in a store beside the served one (which is
    only read, never locked: a server keeps answering and writing). Resumes an interrupted
    reindex of the same model; progress(done, total) as items are copied. `settings` naming
    the Milvus backend: the copy is version vN's collection (CMH_MILVUS_COLLECTION_vN), filled
    from the served one's; its checkpoint and record go to versions/vN/ as for the local store."""
    started = time.perf_counter()
    if not model.is_file():
        raise InputError(f"expected a checkpoint file at {model}, got none")
    milvus = settings is not None and settings.index_backend == "milvus"
    if settings is not None and milvus:
        source_name = served_version(settings)
    else:
        source_name = versions.current_name(artifacts)
        source = versions.version_dir(artifacts, source_name)
        if not Store.exists(source):
            raise InputError(f"expected a store in {source / STORE_DIR} to reindex, found none")
    name, folder, resumed = _target_version(
        artifacts, source_name, file_sha256(model), versions.backend_of(milvus)
    )
    if not (folder / CHECKPOINT_NAME).is_file():
        _copy_model(model, folder)
    served = load_served_model(folder, device=device)
    encoder = Encoder(served.checkpoint, served.backbone, window_ms=0, max_batch=1)
    cache = FeatureCache(artifacts / STORE_CACHE_DIR, max_bytes=cache_bytes)
    with ExitStack() as opened:  # closed last in, first out: the stores, the cache, the encoder
        opened.callback(encoder.close)
        opened.callback(cache.close)
        recoder = Recoder(encoder, cached_features(encoder, cache))
        if settings is not None and milvus:
            source_store = open_item_store(settings, None, shared=False, version=source_name)
            opened.callback(source_store.close)
            target = open_item_store(settings, served.manifest, shared=False, version=name)
            opened.callback(target.close)
            assert isinstance(source_store, MilvusStore) and isinstance(target, MilvusStore)
            one_pass: OnePass = partial(sync_milvus, source_store, target, recoder, batch=batch)
            count: Callable[[], int] = source_store.__len__
        else:
            local = versions.version_dir(artifacts, source_name)  # checked above
            if Store.exists(folder):
                target = Store.open(folder, expected=served.manifest)
            else:
                target = Store.create(folder, served.manifest)
            opened.callback(target.close)
            one_pass = partial(sync, local, target, recoder, batch=batch)
            count = partial(_count, local)
        copied, passes = _run_passes(
            name,
            one_pass,
            count,
            done=len(target),  # a resumed reindex has these already (most up to date)
            progress=progress,
        )
        items = len(target)
    state = versions.read_state(folder)
    state.update(state="ready", items=items, finished=time.time())
    versions.write_state(folder, state)
    return Reindexed(
        name, source_name, items, copied, passes, time.perf_counter() - started, resumed
    )


# One sync pass, called with progress=step (step(n) after n items copied).
OnePass = Callable[..., SyncCounts]


def _run_passes(
    name: str,
    one_pass: OnePass,
    count: Callable[[], int],
    *,
    done: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, int]:
    """Sync passes (one_pass(progress=step), step(n) after n items copied) until one changes
    fewer than SETTLED items, or MAX_PASSES; (items copied, passes). `count`: the source's
    items now; `done`: the target's items at the start; progress(done, total) as items are
    copied."""
    copied, passes, total = 0, 0, count()

    def step(n: int) -> None:
        nonlocal done
        done = min(done + n, total)
        if progress is not None:
            progress(done, total)

    for passes in range(1, MAX_PASSES + 1):
        counts = one_pass(progress=step)
        copied += counts.copied
        logger.info(
            "reindex %s, pass %d: %d copied, %d deleted in %.1f s",
            name, passes, counts.copied, counts.deleted, counts.seconds,
        )  # fmt: skip
        if counts.changed < SETTLED:
            break
        total = count()
    return copied, passes


def _count(source: Path) -> int:
    """Live items of the store in a version folder (a read, no lock)."""
    conn = md.connect_read_only(source / STORE_DIR / DB_NAME)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    finally:
        conn.close()


def _target_version(
    artifacts: Path, source: str, digest: str, backend: str
) -> tuple[str, Path, bool]:
    """(name, folder, resumed) of the version a reindex of the model with this digest builds
    from the served version `source` on `backend`: one newer than the served one, of the same
    model, source and backend (unfinished: resumed; ready and not yet served: brought up to
    date), or a new one."""
    current = versions.version_number(source)
    for version in versions.versions(artifacts, current=source):
        if version.number <= current:
            continue
        state = versions.read_state(version.path)
        same = (
            state.get("model_sha256") == digest
            and state.get("source") == source
            and state.get("backend", versions.LOCAL) == backend
        )
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
    state = {
        "state": "building",
        "source": source,
        "model_sha256": digest,
        "backend": backend,
        "started": time.time(),
    }
    versions.write_state(folder, state)
    return name, folder, False


def _copy_model(model: Path, folder: Path) -> None:
    """The checkpoint into the version's folder (atomic: a crash leaves it whole or absent)."""
    with model.open("rb") as f:
        atomic_write(folder / CHECKPOINT_NAME, lambda out: shutil.copyfileobj(f, out))


def switch_offline(
    artifacts: Path, name: str | None, *, device: str = "auto", settings: Settings | None = None
) -> Switched:
    """The switch of a folder no server has open (`cmh index switch` / `rollback`): the served
    store is opened alone (InputError if a server holds it: switch through the server then).
    On the Milvus backend, the switch of store/milvus_versions.py, replicas running or not."""
    if settings is not None and settings.index_backend == "milvus":
        return switch_milvus_offline(settings, name, device=device)
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


def switch_milvus_offline(settings: Settings, name: str | None, *, device: str) -> Switched:
    """`cmh index switch` on the Milvus backend: the same fenced switch a server makes (the
    replicas follow the pointer), from this process."""
    started = time.perf_counter()
    artifacts = settings.artifacts_dir
    pointer = milvus_pointer(settings)
    with ExitStack() as opened:
        opened.callback(pointer.close)
        current = pointer.read().version
        target = versions.switch_target(artifacts, name, current=current, backend=versions.MILVUS)
        served = load_served_model(target.path, device=device)
        encoder = Encoder(served.checkpoint, served.backbone, window_ms=0, max_batch=1)
        opened.callback(encoder.close)
        old = open_item_store(settings, None, shared=False, version=current)
        opened.callback(old.close)
        new = open_item_store(settings, served.manifest, shared=False, version=target.name)
        opened.callback(new.close)
        assert isinstance(old, MilvusStore) and isinstance(new, MilvusStore)
        counts = switch_milvus(
            pointer, old=old, old_name=current, new=new, new_name=target.name,
            recoder=Recoder(encoder, backbone_features(encoder)),
        )  # fmt: skip
    time.sleep(LEASE_S)  # every replica has read the pointer since it moved
    return Switched(target.name, current, counts, time.perf_counter() - started)
