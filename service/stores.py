"""Which store a process serves and where the served version is named: the local store of a
version folder or the Milvus collection of a version (CMH_INDEX_BACKEND), and CURRENT or the
Milvus pointer (store/versions.py, store/milvus_versions.py). Shared by the app, the reindex and
the command line, so that each opens a store the same way."""

from __future__ import annotations

from pathlib import Path

from common.errors import InputError
from service.settings import Settings
from store import versions
from store.backend import ItemStore
from store.compaction import Compactor
from store.layout import open_store
from store.manifest import Manifest
from store.milvus_store import MilvusStore
from store.milvus_versions import MilvusPointer, PointerWatch, collection_of


def open_item_store(
    settings: Settings,
    expected: Manifest | None,
    *,
    shared: bool,
    folder: Path | None = None,
    version: str = versions.FIRST,
    watch: PointerWatch | None = None,
) -> ItemStore:
    """The system of record the settings name: the local store of the version folder `folder`
    (the served one by default), with its background compactor, or the Milvus collection of
    version `version` (no codes or metadata kept here; `watch`: the pointer its writes check).
    `expected` None: a Milvus collection that is there, with the manifest it holds."""
    if settings.index_backend == "milvus":
        return MilvusStore.open(
            settings.artifacts_dir,
            uri=milvus_uri(settings),
            collection=collection_of(settings.milvus_collection, version),
            expected=expected,
            token=milvus_token(settings),
            timeout_s=settings.milvus_timeout_s,
            guard=watch.guard(version) if watch is not None else None,
            family=settings.milvus_collection,
        )
    assert expected is not None
    folder = folder if folder is not None else versions.serving_dir(settings.artifacts_dir)
    store = open_store(folder, expected=expected, shared=shared)
    Compactor(store)
    return store


def milvus_uri(settings: Settings) -> str:
    """CMH_MILVUS_URI; InputError without one."""
    if not settings.milvus_uri:
        raise InputError("expected CMH_MILVUS_URI with CMH_INDEX_BACKEND=milvus, got none")
    return settings.milvus_uri


def milvus_token(settings: Settings) -> str:
    """CMH_MILVUS_TOKEN, or "" without one."""
    return settings.milvus_token.get_secret_value() if settings.milvus_token else ""


def milvus_pointer(settings: Settings) -> MilvusPointer:
    """The pointer naming the served version of the settings' Milvus collections."""
    return MilvusPointer(
        milvus_uri(settings),
        settings.milvus_collection,
        token=milvus_token(settings),
        timeout_s=settings.milvus_timeout_s,
    )


def served_version(settings: Settings) -> str:
    """The name of the served version: CURRENT, or the Milvus pointer."""
    if settings.index_backend != "milvus":
        return versions.current_name(settings.artifacts_dir)
    pointer = milvus_pointer(settings)
    try:
        return pointer.read().version
    finally:
        pointer.close()
