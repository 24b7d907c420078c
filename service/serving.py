"""The served version of this process, and the switch from one version to another.

Every request holds one `Loaded` (model and store of one version) from its start to its end: it
takes a lease on the version served when it arrives (service/middleware.ServedVersion), so no
request ever mixes two models, and a version switched away from is closed when its last lease
ends. A switch (POST /v1/admin/reload, SIGUSR1, `Serving.switch`) loads the new version while the
old one keeps answering, then swaps them in one assignment after service/reindex.switch_stores
has caught the new store up under the old store's writer lock.

With `cmh serve --workers N` each worker is a process with its own `Serving`: the one that gets
the reload switches and writes CURRENT; the others notice CURRENT changed (one stat per request)
and load the new version before they answer, so a search sent after the reload's answer is
answered by the new model in every worker. A write that reaches a retired store (a worker that
had not noticed yet, a build job that ran across the switch) raises StoreRetired under that
store's writer lock, before anything is written; `write` then follows CURRENT and writes again on
the new version. On the Milvus backend the pointer row in Milvus plays CURRENT's part for every
replica, and its fence the flock's (store/milvus_versions.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from common.errors import InputError, NotReadyError, StoreRetired
from service.state import Loaded
from service.sync import Recoder, Switched, SyncCounts, backbone_features, switch_stores
from service.sync_milvus import switch_milvus
from store import versions
from store.milvus_store import MilvusStore
from store.milvus_versions import LEASE_S, PointerWatch
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


class Follower(Protocol):
    """Where a process learns which version is served: CURRENT, or the Milvus pointer."""

    def stale(self, version: str) -> bool:
        """Whether a process serving `version` must look again before it answers."""
        ...

    def served(self, *, wait_fence: bool = False) -> str:
        """The served version now (`wait_fence`: once no switch is under way)."""
        ...

    def close(self) -> None:
        """Stop watching."""
        ...


class CurrentFile:
    """The local store's follower: CURRENT, compared by one stat per request."""

    def __init__(self, artifacts: Path) -> None:
        self.artifacts = artifacts
        self._path = artifacts / versions.CURRENT_NAME
        self._stamp = _stamp(self._path)
        self._name = versions.current_name(artifacts)  # what CURRENT said at that stamp

    def stale(self, version: str) -> bool:
        # The name too: a request arriving while another loads the version CURRENT now names
        # (the stamp already read) waits for that load rather than answer with the old model.
        return _stamp(self._path) != self._stamp or self._name != version

    def served(self, *, wait_fence: bool = False) -> str:  # noqa: ARG002 (a flock: no fence)
        self._stamp = _stamp(self._path)
        self._name = versions.current_name(self.artifacts)
        return self._name

    def close(self) -> None:
        return None


class Serving:
    """This process's served version: leases, following CURRENT, switching."""

    def __init__(
        self,
        artifacts: Path,
        loaded: Loaded,
        load_version: LoadVersion,
        follower: Follower | None = None,
    ) -> None:
        self.artifacts = artifacts
        self.follower = follower if follower is not None else CurrentFile(artifacts)
        self._load_version = load_version
        self._loaded = loaded
        self._leases: dict[int, int] = {}  # id(Loaded) -> requests holding it
        self._retired: list[Loaded] = []  # switched away from, closed when their leases end
        self._closing: list[threading.Thread] = []  # their closes, joined at shutdown
        self._lock = threading.Lock()  # leases and the swap
        self._switch_lock = threading.Lock()  # one switch (or follow) at a time

    def current(self) -> Loaded:
        """The version served now (what a new request gets)."""
        return self._loaded

    def stale(self) -> bool:
        """Whether CURRENT (or the Milvus pointer) may name another version than the one served
        (another worker or replica switched)."""
        return self.follower.stale(self._loaded.version)

    def follow(self, *, wait_fence: bool = False) -> Loaded:
        """Serve the version CURRENT names, loading it if another process switched to it."""
        with self._switch_lock:
            self._follow_unlocked(wait_fence=wait_fence)
            return self._loaded

    def switch(self, name: str | None) -> Switched:
        """Switch to version `name` (None: the newest ready one after the served one): load it,
        catch it up under the old store's writer lock, name it in CURRENT, serve it."""
        with self._switch_lock:
            started = time.perf_counter()
            self._follow_unlocked()
            old = self._loaded
            milvus = isinstance(old.store, MilvusStore)
            target = versions.switch_target(
                self.artifacts, name, current=old.version, backend=versions.backend_of(milvus)
            )
            new = self._load_version(target.name, old)
            try:
                counts = self._switch_stores(old, new)
            except BaseException:
                new.close()
                raise
            self._swap(new)
            # Read past the fence this switch raised, so that the reading matches what is served
            # now (a reading still showing the old version would load it back).
            self.follower.served(wait_fence=True)
        if milvus:  # every replica has read the pointer since it moved: then answer
            time.sleep(LEASE_S)
        return Switched(target.name, old.version, counts, time.perf_counter() - started)

    def _switch_stores(self, old: Loaded, new: Loaded) -> SyncCounts:
        """The switch proper of the backend: under the old store's flock, or behind the Milvus
        pointer's fence."""
        recoder = Recoder(new.encoder, backbone_features(new.encoder))
        if isinstance(old.store, MilvusStore):
            assert isinstance(new.store, MilvusStore) and isinstance(self.follower, PointerWatch)
            return switch_milvus(
                self.follower.pointer, old=old.store, old_name=old.version, new=new.store,
                new_name=new.version, recoder=recoder,
            )  # fmt: skip
        assert isinstance(old.store, Store) and isinstance(new.store, Store)
        return switch_stores(
            self.artifacts,
            old=old.store,
            old_dir=versions.version_dir(self.artifacts, old.version),
            new=new.store,
            new_name=new.version,
            recoder=recoder,
        )

    def _follow_unlocked(self, *, wait_fence: bool = False) -> None:
        if not wait_fence and not self.follower.stale(self._loaded.version):
            return
        name = self.follower.served(wait_fence=wait_fence)
        if name != self._loaded.version:
            started = time.perf_counter()
            self._swap(self._load_version(name, self._loaded))
            logger.info(
                "following a switch made by another process: now serving %s (%.2f s)",
                name, time.perf_counter() - started,
            )  # fmt: skip

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
            self.follow(wait_fence=True)
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
        self.follower.close()


def switch_in_background(serving: Serving) -> threading.Thread:
    """The switch SIGUSR1 asks for (`kill -USR1` of a server process, or of any one worker of
    `--workers N`: the others follow): to the newest ready version, in a thread, since the signal
    arrives on the event loop; the outcome is logged, a refusal (no newer ready version) as a
    warning."""

    def run() -> None:
        try:
            done = serving.switch(None)
        except (InputError, NotReadyError) as err:
            logger.warning("SIGUSR1: no switch: %s", err)
            return
        except Exception:
            logger.exception("SIGUSR1: the switch failed; the served version is unchanged")
            return
        logger.info(
            "SIGUSR1: now serving %s (was %s); carried over %d written and %d deleted items; "
            "%.2f s", done.version, done.previous, done.caught_up.copied, done.caught_up.deleted,
            done.seconds,
        )  # fmt: skip

    thread = threading.Thread(target=run, name="switch-on-signal", daemon=True)
    thread.start()
    return thread
