"""service/sync.py's one mechanism on the Milvus backend: a collection made to hold another's items
with its own model's codes (reindex), and the switch from one version's collection to another's.

A copy keeps the source row's seq (its tie order) and added time, so a target row is up to date
when it has the source's key with the same seq: every write of the source (an add, a replace)
gives the row a new seq. A pass walks the source's keys in key order a page at a time (Milvus's
query iterator pages by primary key), reads the target's keys of the same range, copies the
source rows the target lacks or has with another seq, and deletes the target's keys the source
does not have. Memory is a page and a batch, whatever the collection's size. The switch (see
store/milvus_versions.py) runs the last pass behind the pointer's fence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from common.errors import ConflictError, IntegrityError
from service.sync import BATCH, Recoder, SyncCounts
from store.metadata import Item
from store.milvus_store import MilvusStore
from store.milvus_versions import LEASE_S, MilvusPointer, Pointer

logger = logging.getLogger(__name__)

STALE_FENCE_S = 120.0  # a fence this old belongs to a switch that died: a new switch takes over


def sync_milvus(
    source: MilvusStore,
    target: MilvusStore,
    recoder: Recoder,
    *,
    batch: int = BATCH,
    progress: Callable[[int], None] | None = None,
) -> SyncCounts:
    """One pass making `target` hold `source`'s items with the recoder's codes (see the module's
    docstring); progress(n) after each n items copied. Writes the source takes meanwhile may be
    left for the next pass."""
    start = time.perf_counter()
    copied = deleted = 0
    pending: list[str] = []
    last: str | None = None

    def flush() -> None:
        nonlocal copied
        if pending:
            n = _copy(pending, source, target, recoder)
            copied += n
            pending.clear()
            if progress is not None:
                progress(n)

    for page in source.keys_and_seqs():
        upto = page[-1][0]
        held = {
            key: seq for rows in target.keys_and_seqs(after=last, upto=upto) for key, seq in rows
        }
        wanted = dict(page)
        gone = [key for key in held if key not in wanted]
        if gone:
            target.delete_keys(gone)
            deleted += len(gone)
        for key, seq in page:
            if held.get(key) != seq:
                pending.append(key)
                if len(pending) >= batch:
                    flush()
        flush()
        last = upto
    for rows in target.keys_and_seqs(after=last):  # past the source's last key: all gone
        target.delete_keys([key for key, _ in rows])
        deleted += len(rows)
    return SyncCounts(copied, deleted, time.perf_counter() - start)


def _copy(keys: list[str], source: MilvusStore, target: MilvusStore, recoder: Recoder) -> int:
    """Encode the source rows of these keys and upsert them into the target; how many (a row
    deleted since its key was read is left out: the next pass sees what the source has then)."""
    rows = source.rows_by_key(keys)
    read: list[tuple[int, Item]] = []
    paths: list[Path] = []
    for key in keys:
        if key not in rows:
            continue
        seq, item = rows[key]
        path = source.artifacts / item.image
        if not path.is_file():
            if source.rows_by_key([key]):
                raise IntegrityError(f"expected the image {path} of item {item.id!r}, got none")
            continue  # deleted since it was read (its image with it)
        read.append((seq, item))
        paths.append(path)
    if read:
        image_codes, text_codes = recoder.codes([item for _, item in read], paths)
        target.copy_rows(read, image_codes, text_codes)
    return len(read)


def switch_milvus(
    pointer: MilvusPointer,
    *,
    old: MilvusStore,
    old_name: str,
    new: MilvusStore,
    new_name: str,
    recoder: Recoder,
) -> SyncCounts:
    """The switch from version old_name's collection to new_name's: fence, wait LEASE_S, last
    pass, pointer to the new version, wait LEASE_S (store/milvus_versions.py says why each).
    ConflictError when another switch is under way; a failure before the pointer moves takes
    the fence down and leaves the old version served."""
    now = pointer.read()
    if now.version != old_name:
        raise ConflictError(f"expected {old_name} to be served, got the pointer at {now.version}")
    if now.fence is not None and time.time() - now.since < STALE_FENCE_S:
        raise ConflictError(
            f"expected no other switch under way, got one to {now.fence} since "
            f"{time.strftime('%H:%M:%S', time.localtime(now.since))}"
        )
    pointer.write(Pointer(old_name, new_name, time.time(), now.epoch + 1))
    try:
        time.sleep(LEASE_S)
        counts = sync_milvus(old, new, recoder)
        pointer.write(Pointer(new_name, None, time.time(), now.epoch + 2))
    except BaseException:
        pointer.write(Pointer(old_name, None, time.time(), now.epoch + 3))
        raise
    pointer.move_alias(new_name)
    time.sleep(LEASE_S)
    logger.info(
        "switched Milvus %s to %s: the last pass copied %d and deleted %d items in %.3f s",
        pointer.family, new_name, counts.copied, counts.deleted, counts.seconds,
    )  # fmt: skip
    return counts
