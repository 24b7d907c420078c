"""The served version of this process, and the switch from one version to another.

Every request holds one `Loaded` (model and store of one version) from its start to its end: it
takes a lease on the version served when it arrives (service/middleware.ServedVersion), so no
request ever mixes two models, and a version switched away from is closed when its last lease
ends. A switch (POST /v1/admin/reload, SIGHUP, `Serving.switch`) loads the new version while the
old one keeps answering, then swaps them in one assignment after service/reindex.switch_stores
has caught the new store up under the old store's writer lock.

With `cmh serve --workers N` each worker is a process with its own `Serving`: the one that gets
the reload switches and writes CURRENT; the others notice CURRENT changed (one stat per request)
and load the new version before they answer, so a search sent after the reload's answer is
answered by the new model in every worker. A write that reaches a retired store (a worker that
had not noticed yet, a build job that ran across the switch) raises StoreRetired under that
store's writer lock, before anything is written; `write` then follows CURRENT and writes again on
the new version.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from common.errors import ConflictError, StoreRetired
from service.state import Loaded
from service.sync import Recoder, Switched, backbone_features, switch_stores
from store import versions
from store.store import Store

logger = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_WRITES = 5  # times a write follows a switch before it gives up (each a new version)
# What loads a version: (its name, the backbone to reuse when the checkpoint names the same one).
LoadVersion = Callable[[str, Loaded | None], Loaded]


def _stamp(path: Path) -> tuple[int, int] | None:
    """What identifies CURRENT's content without reading it: a rename gives a new inode."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


class Serving:
    """This process's served version: leases, following CURRENT, switching."""

    def __init__(self, artifacts: Path, loaded: Loaded, load_version: LoadVersion) -> None:
        self.artifacts = artifacts
        self._current_path = artifacts / versions.CURRENT_NAME
        self._load_version = load_version
        self._loaded = loaded
        self._stamp = _stamp(self._current_path)
        self._leases: dict[int, int] = {}  # id(Loaded) -> requests holding it
        self._retired: list[Loaded] = []  # switched away from, closed when their leases end
        self._closing: list[threading.Thread] = []  # their closes, joined at shutdown
        self._lock = threading.Lock()  # leases and the swap
        self._switch_lock = threading.Lock()  # one switch (or follow) at a time

    def current(self) -> Loaded:
        """The version served now (what a new request gets)."""
        return self._loaded

    def stale(self) -> bool:
        """Whether CURRENT changed since this process last read it (another worker switched)."""
        return _stamp(self._current_path) != self._stamp

    def follow(self) -> Loaded:
        """Serve the version CURRENT names, loading it if another process switched to it."""
        with self._switch_lock:
            self._follow_unlocked()
            return self._loaded

    def switch(self, name: str | None) -> Switched:
        """Switch to version `name` (None: the newest ready one after the served one): load it,
        catch it up under the old store's writer lock, name it in CURRENT, serve it."""
        with self._switch_lock:
            started = time.perf_counter()
            self._follow_unlocked()
            old = self._loaded
            if not isinstance(old.store, Store):
                raise ConflictError(
                    "expected the local store (CMH_INDEX_BACKEND=memory) for a version switch, "
                    "got the Milvus backend, whose versions are not supported yet"
                )
            target = versions.switch_target(self.artifacts, name)
            new = self._load_version(target.name, old)
            try:
                assert isinstance(new.store, Store)
                recoder = Recoder(new.encoder, backbone_features(new.encoder))
                counts = switch_stores(
                    self.artifacts,
                    old=old.store,
                    old_dir=versions.version_dir(self.artifacts, old.version),
                    new=new.store,
                    new_name=target.name,
                    recoder=recoder,
                )
            except BaseException:
                new.close()
                raise
            self._swap(new)
            self._stamp = _stamp(self._current_path)
            return Switched(target.name, old.version, counts, time.perf_counter() - started)

    def _follow_unlocked(self) -> None:
        stamp = _stamp(self._current_path)
        if stamp == self._stamp:
            return
        name = versions.current_name(self.artifacts)
        if name != self._loaded.version:
            started = time.perf_counter()
            self._swap(self._load_version(name, self._loaded))
            logger.info(
                "following a switch made by another process: now serving %s (%.2f s)",
                name, time.perf_counter() - started,
            )  # fmt: skip
        self._stamp = stamp

    def _swap(self, new: Loaded) -> None:
        """Serve `new`; the old version closes when the requests holding it have ended."""
        with self._lock:
            old, self._loaded = self._loaded, new
            self._retired.append(old)
        self._close_unleased()

    def enter(self) -> Loaded:
        """A lease on the served version for one request (leave() ends it)."""
        with self._lock:
            loaded = self._loaded
            self._leases[id(loaded)] = self._leases.get(id(loaded), 0) + 1
            return loaded

    def leave(self, loaded: Loaded) -> None:
        """End a lease; the last one on a version switched away from closes it."""
        with self._lock:
            left = self._leases[id(loaded)] - 1
            if left:
                self._leases[id(loaded)] = left
            else:
                del self._leases[id(loaded)]
        if not left and self._retired:
            self._close_unleased()

    def _close_unleased(self) -> None:
        with self._lock:
            done = [r for r in self._retired if id(r) not in self._leases]
            self._retired = [r for r in self._retired if id(r) in self._leases]
        for loaded in done:
            logger.info("closing version %s: no request holds it any more", loaded.version)
            # Off the caller's thread (the event loop, at a request's end): closing stops the
            # store's compactor, which waits for a merge in progress.
            closing = threading.Thread(target=loaded.close, name=f"close-{loaded.version}")
            closing.start()
            self._closing.append(closing)

    def write(self, work: Callable[[Loaded], T]) -> T:
        """Run a write on the served version; when it reaches a retired store (a switch came
        first), follow CURRENT and run it again on the version now served."""
        for _ in range(RETRY_WRITES):
            loaded = self.enter()
            try:
                return work(loaded)
            except StoreRetired:
                logger.info("a write reached retired version %s: writing again", loaded.version)
            finally:
                self.leave(loaded)
            self.follow()
        raise StoreRetired(
            f"expected the served version to take the write, got {RETRY_WRITES} switches"
        )

    def close(self) -> None:
        """Stop the job worker (after its job), then close every version this process holds
        (at shutdown)."""
        self._loaded.jobs.close()
        with self._lock:
            every, self._retired = [*self._retired, self._loaded], []
        for loaded in every:
            loaded.close()
        for closing in self._closing:
            closing.join()
