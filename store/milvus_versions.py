"""Versions on the Milvus backend: a collection per version, and one row naming the served one.

The local store names the served version in the file CURRENT, and a switch holds every writer
of the old store under its flock (store/versions.py). Replicas of the Milvus backend share no
file lock and may run on several hosts, so both jobs are done in Milvus:

- Version v1 is the collection CMH_MILVUS_COLLECTION (`cmh_items`), as it always was; version
  vN is `cmh_items_vN`. Each holds its manifest in its description, checked at open as always.
  The checkpoints stay in the artifacts folder's versions/vN/ (with reindex.json), which the
  replicas share as they share images/.
- The control collection `cmh_items_cmh_versions` holds one row, the pointer: the served
  version, a fence (the version a switch under way goes to) and an epoch that every change of
  the pointer increases. No row: v1, no fence.
- Where the server has them, the alias `cmh_items_served` is moved to the served collection for
  other Milvus clients (alter_alias); milvus-lite 2.5.1 answers UNIMPLEMENTED to every alias
  call (and to rename_collection and collection properties), so the pointer row is what `cmh`
  itself follows.

Every process watches the pointer (PointerWatch: a read every POLL_S in a thread) and trusts
what it read for at most LEASE_S: older than that, the next request reads it again before it is
answered. A switch (service/sync_milvus.switch_milvus):
1. raises the fence. A write checks the pointer before it writes (StoreRetired under a fence:
   Serving.write waits for the switch and writes on the new version);
2. waits LEASE_S: a write that saw no fence has then been acknowledged, or (it took longer than
   LEASE_S from the pointer read it relied on) it reads the pointer again after writing and,
   finding the fence, answers 503 (it may be in either version: retry);
3. runs the last sync pass, so every acknowledged write is in the new version;
4. names the new version (no fence, epoch + 1) and waits LEASE_S again before it answers: by
   then every process has read the pointer since, so a search sent after the switch's answer
   is answered by the new model on every replica.
The reasoning needs Milvus's Strong consistency (a read after an acknowledged write sees it)
and clocks that measure time alike (durations only; the hosts' clocks need not agree).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass

from pymilvus import DataType, MilvusClient

from common.errors import NotReadyError, StoreRetired
from store.milvus_store import MILVUS_FAILURES, milvus_call
from store.versions import FIRST, version_number

logger = logging.getLogger(__name__)

CONTROL_SUFFIX = "_cmh_versions"  # the pointer's collection: CMH_MILVUS_COLLECTION + this
ALIAS_SUFFIX = "_served"  # the alias moved to the served collection, where Milvus has aliases
POINTER_KEY = "served"
POLL_S = 0.2  # how often a process reads the pointer
LEASE_S = 2.0  # how long a process trusts a pointer it read (a switch waits this long, twice)
FRESH_S = 0.5  # a write reads the pointer itself when the last read is older than this
FENCE_WAIT_S = 60.0  # how long a write waits for a switch under way before a 503


def collection_of(family: str, name: str) -> str:
    """The collection of version `name` of the store whose v1 collection is `family`."""
    return family if version_number(name) == 1 else f"{family}_{name}"


@dataclass(frozen=True)
class Pointer:
    """The served version, and the version a switch under way goes to."""

    version: str = FIRST
    fence: str | None = None  # a switch to this version is under way
    since: float = 0.0  # when the fence was raised (time.time(), for messages)
    epoch: int = 0  # increases with every change


class MilvusPointer:
    """The pointer row of one store's versions, read and written through its own connection."""

    def __init__(self, uri: str, family: str, *, token: str = "", timeout_s: float = 10.0):
        self.uri, self.family, self.timeout_s = uri, family, timeout_s
        self.collection = family + CONTROL_SUFFIX
        self._timeout = max(1, math.ceil(timeout_s))
        try:
            self._client = MilvusClient(
                uri=uri, token=token, timeout=self._timeout, alias=f"cmh-{uuid.uuid4().hex}"
            )
        except MILVUS_FAILURES as err:
            raise NotReadyError(f"expected Milvus at {uri} to answer, got: {err}") from None
        self._ready = False

    def _ensure(self) -> None:
        """Create (or load) the control collection on first use."""
        if self._ready:
            return
        client, t = self._client, self._timeout
        if not client.has_collection(self.collection, timeout=t):
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
            schema.add_field("doc", DataType.JSON)
            # Milvus wants a vector field in every collection; this one is never searched.
            schema.add_field("unused", DataType.BINARY_VECTOR, dim=8)
            index = client.prepare_index_params()
            index.add_index(field_name="unused", index_type="BIN_FLAT", metric_type="HAMMING")
            try:
                client.create_collection(
                    self.collection, schema=schema, index_params=index,
                    consistency_level="Strong", timeout=t,
                )  # fmt: skip
            except MILVUS_FAILURES:
                # Replicas starting at once: another made it first (anything else fails again).
                if not client.has_collection(self.collection, timeout=t):
                    raise
        client.load_collection(self.collection, timeout=t)
        self._ready = True

    def read(self) -> Pointer:
        """The pointer as Milvus has it now (NotReadyError when it does not answer)."""

        def read() -> Pointer:
            self._ensure()
            rows = self._client.query(
                self.collection, filter=f'key == "{POINTER_KEY}"', output_fields=["doc"],
                timeout=self._timeout,
            )  # fmt: skip
            if not rows:
                return Pointer()
            doc = rows[0]["doc"]
            return Pointer(str(doc["version"]), doc.get("fence"), float(doc.get("since", 0)),
                           int(doc.get("epoch", 0)))  # fmt: skip

        return milvus_call(self.uri, self.timeout_s, read)

    def write(self, pointer: Pointer) -> None:
        """Replace the pointer (acknowledged when this returns)."""
        doc = {"version": pointer.version, "fence": pointer.fence, "since": pointer.since,
               "epoch": pointer.epoch}  # fmt: skip

        def write() -> None:
            self._ensure()
            self._client.upsert(
                self.collection, [{"key": POINTER_KEY, "doc": doc, "unused": bytes(1)}],
                timeout=self._timeout,
            )  # fmt: skip

        milvus_call(self.uri, self.timeout_s, write)
        logger.info("Milvus versions pointer of %s: %s", self.family, json.dumps(doc))

    def move_alias(self, name: str) -> bool:
        """Point the alias FAMILY_served at version `name`'s collection, where the server has
        aliases; False where it has not (milvus-lite)."""
        alias, target = self.family + ALIAS_SUFFIX, collection_of(self.family, name)
        try:
            try:
                self._client.alter_alias(target, alias, timeout=self._timeout)
            except MILVUS_FAILURES as err:
                if "UNIMPLEMENTED" in str(err):
                    raise
                self._client.create_alias(target, alias, timeout=self._timeout)
        except MILVUS_FAILURES as err:
            logger.info("no alias %s moved (%s): this Milvus has no aliases", alias, err)
            return False
        return True

    def drop_version(self, name: str) -> None:
        """Drop version `name`'s collection (prune)."""
        milvus_call(
            self.uri, self.timeout_s, self._client.drop_collection,
            collection_of(self.family, name), timeout=self._timeout,
        )  # fmt: skip

    def close(self) -> None:
        """Close the connection."""
        self._client.close()


class PointerWatch:
    """One process's view of the pointer: read every POLL_S in a thread, trusted LEASE_S."""

    def __init__(self, pointer: MilvusPointer) -> None:
        self.pointer = pointer
        self._lock = threading.Lock()
        self._seen = pointer.read()
        self._read_at = time.monotonic()  # when the read that gave _seen was sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="milvus-pointer", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.read()
            except (NotReadyError, Exception):  # noqa: BLE001 (a request reads it itself)
                logger.debug("the pointer read failed; requests read it themselves", exc_info=True)

    def read(self) -> tuple[Pointer, float]:
        """Read the pointer now; (it, when the read was sent)."""
        sent = time.monotonic()
        seen = self.pointer.read()
        with self._lock:
            if sent > self._read_at:
                self._seen, self._read_at = seen, sent
            return self._seen, self._read_at

    def seen(self, *, within: float = LEASE_S) -> tuple[Pointer, float]:
        """The pointer, read at most `within` seconds ago (read again if older)."""
        with self._lock:
            seen, at = self._seen, self._read_at
        if time.monotonic() - at < within:
            return seen, at
        return self.read()

    def stale(self, version: str) -> bool:
        """Whether a process serving `version` must look again before answering: the pointer
        names another version, or it was read too long ago to be trusted."""
        with self._lock:
            seen, at = self._seen, self._read_at
        return seen.version != version or time.monotonic() - at >= LEASE_S

    def served(self, *, wait_fence: bool = False) -> str:
        """The served version, read within LEASE_S; `wait_fence`: once no switch is under way
        (what a write that met a fence waits for; a 503 after FENCE_WAIT_S)."""
        seen, _ = self.seen()
        deadline = time.monotonic() + FENCE_WAIT_S
        while wait_fence and seen.fence is not None:
            if time.monotonic() > deadline:
                raise NotReadyError(
                    f"expected the switch to {seen.fence} (under way since "
                    f"{time.strftime('%H:%M:%S', time.localtime(seen.since))}) to finish within "
                    f"{FENCE_WAIT_S:g} s, got no end; retry, and if the switching process died, "
                    "switch again (POST /v1/admin/reload or `cmh index switch`)"
                )
            time.sleep(POLL_S / 2)
            seen, _ = self.read()
        return seen.version

    def guard(self, version: str) -> VersionGuard:
        """The write guard of version `version`'s collection."""
        return VersionGuard(self, version)

    def close(self) -> None:
        """Stop the thread and close the connection."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.pointer.close()


class VersionGuard:
    """Checks around each write to one version's collection (see the module's docstring)."""

    def __init__(self, watch: PointerWatch, version: str) -> None:
        self.watch, self.version = watch, version

    def before(self) -> object:
        seen, at = self.watch.seen(within=FRESH_S)
        if seen.version != self.version or seen.fence is not None:
            raise StoreRetired(
                f"expected version {self.version} to take writes, got the pointer at "
                f"{seen.version}" + (f" switching to {seen.fence}" if seen.fence else "")
            )
        return (seen.epoch, at)

    def after(self, token: object) -> None:
        assert isinstance(token, tuple)
        epoch, at = token
        if time.monotonic() - at < LEASE_S:
            return  # a switch waits LEASE_S after its fence before its last pass: it sees this
        seen, _ = self.watch.read()
        if seen.epoch != epoch:
            raise NotReadyError(
                f"expected the write to finish within {LEASE_S:g} s of its check, got a switch "
                f"to {seen.fence or seen.version} meanwhile: it may be in either version; retry"
            )
