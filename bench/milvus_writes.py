"""`cmh bench writes --backend milvus`: what MilvusStore's writes and searches cost at N items.

The same synthetic items as bench/writes.py (seeded codes, demo-like captions, integer ids
0..N-1, no fields), written through MilvusStore into one collection of a Milvus server: the one at
--uri, or a milvus-lite server this process starts (store/milvus_lite.py). A second MilvusStore
over the same collection, on its own gRPC connection, stands for a second API replica.

JSON keys (wall-clock time on this machine; "median" means over `repeats` calls, each timed alone):
  backend, uri, n, bits, batch, repeats, queries, python, milvus_lite
  ingest_items_per_s, ingest_s   n / seconds spent inside MilvusStore.add while filling it
  add_1_ms, add_1000_ms          median add of 1 / 1,000 new items at n items
  add_1_ms_at                    {"<size>": median add_1 when the collection held that many}:
                                 a write's cost against N (O(batch) means flat)
  delete_1_ms, delete_1000_ms    median delete of 1 / 1,000 existing random ids
  search_p50_ms, search_p99_ms   one-query MilvusStore.search("image", q, 10), with metadata
  visible_ms_p50, visible_ms_max time from an add acknowledged through one store to the first
                                 get of that id through the other that finds it (each get
                                 timed; Strong consistency: the first get should find it)
  visible_first_get              fraction of those adds that the other store's first get found
  peers     local_add_1_ms: the same add_1 on the local Store (store/store.py) in a folder
            beside, timed in turn with Milvus's, as the floor a single node gives;
            pk_query_ms_at: {"<size>": median bare pymilvus query of one existing id by primary
            key (`id in ["k"]`), timed in turn with add_1}: the lookup that an add's conflict
            check, an upsert and a delete each make inside Milvus
  notes     how the figures were made
"""

from __future__ import annotations

import logging
import platform
import time
import uuid
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import MilvusClient

from bench.writes import (
    K,
    _median_ms,
    _medians_ms,
    _search_ms,
    random_codes,
    synthetic_items,
)
from store.manifest import Manifest
from store.milvus_lite import MilvusLite
from store.milvus_store import MilvusStore
from store.store import Store

logger = logging.getLogger(__name__)

VISIBILITY_POLL_S = 0.001  # between the second store's gets while an add is not yet seen
VISIBILITY_DEADLINE_S = 30.0


def _fill(store: MilvusStore, rng: np.random.Generator, first: int, n: int, batch: int) -> float:
    """Add ids first..n-1 in `batch`-item adds; the seconds spent inside add."""
    spent = 0.0
    for start in range(first, n, batch):
        items = synthetic_items(rng, start, min(batch, n - start), store.n_bits)
        begin = time.perf_counter()
        store.add(items)
        spent += time.perf_counter() - begin
        logger.info("ingested %d / %d items", start + len(items), n)
    return spent


def _lookup(client: MilvusClient, collection: str, item_id: int) -> None:
    """The primary-key query both an add's conflict check and a delete make, bare pymilvus."""
    if not client.query(collection, filter=f'id in ["{item_id}"]', output_fields=["id"]):
        raise RuntimeError(f"item {item_id} missing from {collection}")


def _visibility(
    writer: MilvusStore, reader: MilvusStore, rng: np.random.Generator, next_id: int, count: int
) -> tuple[list[float], int]:
    """Milliseconds from each add's acknowledgement through `writer` until `reader` gets it,
    and how many were found by the first get."""
    delays, first_get = [], 0
    for r in range(count):
        item_id = next_id + r
        writer.add(synthetic_items(rng, item_id, 1, writer.n_bits))
        acked, tries = time.perf_counter(), 0
        while reader.get(item_id) is None:
            tries += 1
            if time.perf_counter() - acked > VISIBILITY_DEADLINE_S:
                raise RuntimeError(f"item {item_id} not visible after {VISIBILITY_DEADLINE_S} s")
            time.sleep(VISIBILITY_POLL_S)
        delays.append((time.perf_counter() - acked) * 1e3)
        first_get += tries == 0
    return delays, first_get


def bench_milvus_writes(
    *,
    root: Path,
    n: int,
    n_bits: int = 64,
    repeats: int = 5,
    batch: int = 10_000,
    queries: int = 200,
    uri: str | None = None,
) -> dict[str, Any]:
    """Fill a new collection with n items and measure it: the documented JSON."""
    rng = np.random.default_rng(0)
    manifest = Manifest(n_bits, "synthetic", "", "", time.time())
    server = None
    if uri is None:
        server = MilvusLite(root / "milvus.db")
        server.start()
        uri = server.uri
    collection = f"bench_{uuid.uuid4().hex[:12]}"
    store = MilvusStore.open(root, uri=uri, collection=collection, expected=manifest, timeout_s=60)
    other = MilvusStore.open(root, uri=uri, collection=collection, expected=manifest, timeout_s=60)
    local = Store.create(root / "local", manifest)
    bare = MilvusClient(uri=uri, alias=f"bench-{collection}")
    try:
        result: dict[str, Any] = {"backend": "milvus", "uri": uri, "n": n, "bits": n_bits}
        result |= {"batch": batch, "repeats": repeats, "queries": queries}
        result["python"] = platform.python_version()
        try:
            result["milvus_lite"] = version("milvus-lite") if server is not None else None
        except PackageNotFoundError:
            result["milvus_lite"] = None
        next_id, ingest_s, filled, at, lookup_at = n, 0.0, 0, {}, {}
        local_adds = []
        for size in sorted({max(1, n // 10), n}):
            ingest_s += _fill(store, rng, filled, size, batch)
            filled = size
            adds = [synthetic_items(rng, next_id + r, 1, n_bits) for r in range(repeats + 1)]
            store.add(adds[0])  # warm-up: not timed
            keys = rng.integers(0, size, repeats).tolist()
            ours, floor, lookup = _medians_ms(
                [partial(store.add, a) for a in adds[1:]],
                [partial(local.add, a) for a in adds[1:]],
                [partial(_lookup, bare, collection, key) for key in keys],
            )
            at[str(size)], lookup_at[str(size)] = ours, lookup
            local_adds.append(floor)
            next_id += repeats + 1
        result |= {"ingest_items_per_s": n / ingest_s, "ingest_s": ingest_s}
        result["add_1_ms_at"] = at
        result["add_1_ms"] = at[str(n)]
        thousands = [synthetic_items(rng, next_id + r * 1000, 1000, n_bits) for r in range(repeats)]
        next_id += 1000 * repeats
        result["add_1000_ms"] = _median_ms([partial(store.add, a) for a in thousands])
        victims = rng.permutation(n)[: repeats * 1001].tolist()
        result["delete_1_ms"] = _median_ms([partial(store.delete, [v]) for v in victims[:repeats]])
        rest = victims[repeats:]
        groups = [rest[r * 1000 : (r + 1) * 1000] for r in range(repeats)]
        result["delete_1000_ms"] = _median_ms([partial(store.delete, g) for g in groups])
        qs = random_codes(rng, queries + 5, n_bits)
        _search_ms(store, qs[:5])  # warm-up
        p50, p99 = np.percentile(_search_ms(store, qs[5:]), [50, 99])
        result |= {"search_p50_ms": float(p50), "search_p99_ms": float(p99)}
        delays, first_get = _visibility(store, other, rng, next_id, max(20, repeats))
        result["visible_ms_p50"] = float(np.median(delays))
        result["visible_ms_max"] = float(np.max(delays))
        result["visible_first_get"] = first_get / len(delays)
        result["peers"] = {
            "local_add_1_ms": float(np.median(local_adds)),
            "pk_query_ms_at": lookup_at,
        }
        result["notes"] = (
            f"one collection on {'milvus-lite ' if server else ''}{uri}, Strong consistency; "
            f"filled by MilvusStore.add in batches of {batch} (ids 0..n-1, each batch checked "
            "for existing ids as a build is); add_1 timed at n/10 and n items, in turn with the "
            "local Store's add_1 (a folder beside, on the same disk); searches are single "
            f"image-target queries, k={K}, metadata included; visibility: a second MilvusStore "
            "on its own gRPC connection, as a second replica, polled every "
            f"{VISIBILITY_POLL_S * 1e3:g} ms"
        )
        return result
    finally:
        bare.close()
        local.close()
        other.close()
        store.drop()
        store.close()
        if server is not None:
            server.kill()
