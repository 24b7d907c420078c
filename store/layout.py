"""Where things live in an artifacts folder, and the one way to open its store."""

from __future__ import annotations

import logging
from pathlib import Path

from store import legacy
from store.locks import LOCK_NAME, hold_flock
from store.manifest import Manifest
from store.store import STORE_DIR, Store

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "model.pt"  # the served AUCMH checkpoint


def open_store(artifacts: Path, *, expected: Manifest, shared: bool = False) -> Store:
    """The artifacts' store: opened and checked, migrated from generations, or made empty.

    A generation-format index/ still present means a migration has not finished (its last step
    renames index/), so it is run (again) before anything else, in this process alone.
    `shared`: opened for several processes at once (see Store.open).
    """
    if legacy.has_generations(artifacts):
        store, _ = legacy.migrate(artifacts, expected=expected)
        if not shared:
            return store
        store.close()
    if Store.exists(artifacts):
        return Store.open(artifacts, expected=expected, shared=shared)
    logger.warning("no index in %s yet: starting an empty store", artifacts)
    return Store.create(artifacts, expected, shared=shared)


def check_store_free(artifacts: Path) -> None:
    """Refuse at once (InputError, one line) when another process has the artifacts' store open,
    as a running server does: what an offline build asks before it loads a model or a dataset.
    Only an early answer: open_store takes the lock itself."""
    lock = artifacts / STORE_DIR / LOCK_NAME
    if lock.is_file():
        hold_flock(lock, shared=False).close()
