"""What a filter costs a search: filtered vs unfiltered store.search at N items, side by side.

    .venv/bin/python -m bench.filters --n 1000000 --json docs/results/bench-filters.json

A real store in a temporary folder: N items with random 64-bit codes, demo-like captions and
three user fields each, "half" (2 values: a filter keeps 50%), "pct" (100 values: 1%) and "bp"
(10,000 values: 0.01%), ingested in bulk batches, compacted as the store's policy asks, then a
few hundred one-item adds so that a growing part is searched too. Per selectivity, one-query
searches (k = 10, text -> image) alternate with unfiltered ones, each timed alone.

JSON keys (milliseconds are medians over --queries one-query searches unless said otherwise):
  n, bits, k, queries, threads, python, numpy   the sizes; threads one search uses
  ingest_items_per_s     N / seconds inside store.add while building (three fields per item)
  ingest_no_fields_items_per_s   the same batches without fields, added in turn to a peer store
  add_1_ms               median store.add of one item with fields, at N items
  segments               parts of the view that is searched (segments and the growing part)
  selectivity            per filter ("50%", "1%", "0.01%"):
    filter               its equals clause; kept: the items that pass; fraction: kept / N
    search_ms            store.search with the filter (warm caches: the steady state)
    unfiltered_ms        store.search without one, alternating with search_ms
    ratio                search_ms / unfiltered_ms
    eval_ms              the filter's evaluation alone: the parts, masks or gathered rows it
                         hands to the scan (FilterIndex.parts), warm
    first_search_ms      the first search with the filter (median of --cold runs, caches
                         emptied before each): reads the posting list from SQLite
    scan                 how the parts were scanned: "masked" (live AND filter bits) or
                         "gathered" (only the passing rows' codes)
    checked              the filtered hits of --check queries equal brute force over the kept
                         items (ids and distances, ties by insertion order)
  json_extract_ms        per selectivity, one SQLite `json_extract(fields, '$.f') = ?` scan of
                         the items table: what answering a filter without the terms table costs
  notes                  how the figures were made
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.writes import caption_pool, random_codes
from indexes.hamming import HammingIndex
from store.compaction import compact_once
from store.filters import Filter
from store.manifest import Manifest
from store.rows import NewItems
from store.store import DB_NAME, STORE_DIR, Store

logger = logging.getLogger(__name__)

K = 10
BATCH = 100_000  # items per store.add while building (bulk segments)
SELECTIVITIES = {"50%": ("half", 2), "1%": ("pct", 100), "0.01%": ("bp", 10_000)}
MANIFEST = Manifest(
    n_bits=64,
    image_backbone="bench",
    vocabulary_sha256="0" * 64,
    checkpoint_sha256="0" * 64,
    created=0.0,
)


def fields_for(ids: range) -> list[dict[str, str]]:
    """Three fields per item, each value a function of the id (so counts are known)."""
    return [{"half": f"h{i % 2}", "pct": f"p{i % 100}", "bp": f"b{i % 10_000}"} for i in ids]


def items(rng: np.random.Generator, first: int, count: int) -> NewItems:
    ids = range(first, first + count)
    return NewItems(
        ids=ids,
        texts=caption_pool()[rng.integers(0, len(caption_pool()), count)].tolist(),
        images=[f"images/{i}.jpg" for i in ids],
        image_codes=random_codes(rng, count, MANIFEST.n_bits),
        text_codes=random_codes(rng, count, MANIFEST.n_bits),
        fields=fields_for(ids),
    )


def build(store: Store, peer: Store, n: int, rng: np.random.Generator) -> tuple[float, float]:
    """Fill the store (bulk batches, then a growing part), and the peer with the same batches
    without fields, in turn; items/s inside store.add of each."""
    spent, peer_spent, done = 0.0, 0.0, 0
    growing = min(500, n // 10)
    while done < n - growing:
        batch = items(rng, done, min(BATCH, n - growing - done))
        spent += timed_ms(partial(store.add, batch)) / 1e3
        peer_spent += timed_ms(partial(peer.add, replace(batch, fields=None))) / 1e3
        done += len(batch)
        logger.info("ingested %d / %d items (%.0f items/s)", done, n, done / spent)
    while compact_once(store):
        pass
    for first in range(done, n, 50):
        store.add(items(rng, first, min(50, n - first)))
    return (n - growing) / spent, (n - growing) / peer_spent


def timed_ms(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def brute_force(
    live: tuple[np.ndarray, np.ndarray], query: np.ndarray, kept: np.ndarray, k: int
) -> list[tuple[int, int]]:
    """(id, distance) of the exact top-k among the kept ids, given the store's live (seqs,
    image codes): ids were added in order, one per seq, so seq order is id order."""
    seqs, codes = live
    assert np.array_equal(seqs[: kept[-1] + 1], np.arange(kept[-1] + 1))  # seq = id
    dists = np.bitwise_count(codes[kept] ^ query).sum(axis=1)
    order = np.lexsort((kept, dists))[:k]
    return [(int(kept[j]), int(dists[j])) for j in order]


def measure(
    store: Store,
    field: str,
    values: int,
    queries: np.ndarray,
    *,
    cold: int,
    live: tuple[np.ndarray, np.ndarray],
    check: int,
) -> dict[str, Any]:
    """One selectivity's figures (see the module's JSON keys)."""
    value = f"{field[0]}{7 % values}"
    where = Filter.of(equals={field: value})
    kept = np.arange(7 % values, int(live[0].size), values)  # ids 0..n-1 with that value
    filtered, plain = [], []
    for q in queries[:, None]:
        filtered.append(timed_ms(partial(store.search, "image", q, K, where=where)))
        plain.append(timed_ms(partial(store.search, "image", q, K)))
    evals = [timed_ms(partial(store.scan_plan, "image", where)) for _ in queries]
    whole = {id(p.image) for p in store.view().parts}
    scanned = store.scan_plan("image", where)
    gathered = any(id(index) not in whole for index, _ in scanned)
    firsts = []
    for _ in range(cold):
        store.drop_filter_caches()  # the first search after a start
        firsts.append(timed_ms(lambda: store.search("image", queries[:1], K, where=where)))
    checked = True
    for q in queries[:check]:
        hits = store.search("image", q[None], K, where=where).hits[0]
        checked &= [(int(item.id), d) for item, d in hits] == brute_force(live, q, kept, K)
    search_ms, unfiltered_ms = float(np.median(filtered)), float(np.median(plain))
    return {
        "filter": {"equals": {field: value}},
        "kept": int(kept.size),
        "fraction": kept.size / len(store),
        "search_ms": search_ms,
        "unfiltered_ms": unfiltered_ms,
        "ratio": search_ms / unfiltered_ms,
        "eval_ms": float(np.median(evals)),
        "first_search_ms": float(np.median(firsts)),
        "scan": "gathered" if gathered else "masked",
        "checked": bool(checked),
    }


def json_extract_ms(artifacts: Path, field: str) -> float:
    """One scan of the items table with json_extract (the peer the terms table replaces)."""
    conn = sqlite3.connect(artifacts / STORE_DIR / DB_NAME)
    try:
        sql = f"SELECT seq FROM items WHERE json_extract(fields, '$.{field}') = ?"
        return timed_ms(lambda: conn.execute(sql, (f"{field[0]}1",)).fetchall())
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="items in the store")
    parser.add_argument("--queries", type=int, default=200, help="timed searches per figure")
    parser.add_argument("--cold", type=int, default=5, help="first searches timed per filter")
    parser.add_argument("--check", type=int, default=5, help="queries checked by brute force")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = Path(tmp) / "artifacts"
        store = Store.create(artifacts, MANIFEST)
        peer = Store.create(Path(tmp) / "peer", MANIFEST)
        try:
            ingest, peer_ingest = build(store, peer, args.n, rng)
            add_1 = [timed_ms(partial(store.add, items(rng, args.n + r, 1))) for r in range(21)]
            store.delete(list(range(args.n, args.n + 21)))  # back to seq = id = position
            while compact_once(store):
                pass
            queries = random_codes(rng, args.queries, MANIFEST.n_bits)
            for q in queries[:20]:  # warm up: kernels compiled, pages mapped
                store.search("image", q[None], K)
            result: dict[str, Any] = {
                "n": args.n,
                "bits": MANIFEST.n_bits,
                "k": K,
                "queries": args.queries,
                "threads": HammingIndex(MANIFEST.n_bits).threads,
                "python": platform.python_version(),
                "numpy": np.__version__,
                "ingest_items_per_s": ingest,
                "ingest_no_fields_items_per_s": peer_ingest,
                "add_1_ms": float(np.median(add_1)),
                "segments": len(store.view().parts),
                "selectivity": {},
                "json_extract_ms": {},
            }
            seqs, image, _ = store.live_rows()
            for name, (field, values) in SELECTIVITIES.items():
                got = measure(
                    store,
                    field,
                    values,
                    queries,
                    cold=args.cold,
                    live=(seqs, image),
                    check=args.check,
                )
                result["selectivity"][name] = got
                logger.info("%s: %s", name, got)
        finally:
            store.close()
            peer.close()
        for name, (field, _) in SELECTIVITIES.items():
            result["json_extract_ms"][name] = json_extract_ms(artifacts, field)
    result["notes"] = (
        "one process, store.search('image', one query, k=10); filtered and unfiltered searches "
        "alternate; medians; the index searched is the store's own (no Milvus)"
    )
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", "utf-8")
    print(text)  # noqa: T201 (a script's output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
