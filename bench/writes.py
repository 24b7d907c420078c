"""`cmh bench writes`: what the store's writes cost, and what they do to searches, at N items.

A real store in a real folder, filled with synthetic items: codes from a seeded generator,
demo-like captions, image paths "images/<i>.jpg" (never read), integer ids 0..N-1, no fields.

JSON keys (wall-clock time on this machine; "median" means over `repeats` calls, each timed alone):
  n, bits, batch, repeats, queries   the sizes asked for (batch: items per store.add in the build)
  python, threads                    Python version; threads one search uses (HammingIndex default)
  store_sha256                       SHA-256 of store/*.py (but this file): the code measured
  ingest_items_per_s, ingest_s       n / seconds spent inside store.add while building the store
  segments, segments_compacted       parts in the view after the build / after compaction settles
  compaction_s                       seconds of compact_once until the merge policy is satisfied
  add_1_ms, add_1000_ms              median store.add of 1 / 1,000 new items (a Compactor running)
  delete_1_ms, delete_1000_ms        median store.delete of 1 / 1,000 existing random ids
  search_p50_idle_ms, search_p99_idle_ms      one-query store.search("image", q, 10) latency
  search_p50_ingest_ms, search_p99_ingest_ms  the same while a thread adds 100 items every 0.1 s
  ingest_during_search_items_per_s            what that thread achieved
  disk_bytes_per_item, disk_bytes    bytes under artifacts/store (database, WAL, shm, segments)
  startup_s                          median, in fresh processes, of Store.open + the first search
  open_s, growing_rows               Store.open alone; rows not yet in a segment that it reloads
  startup_process_s                  median wall time of that whole child (interpreter, imports)
  rss_mb, rss_empty_mb               VmRSS (MiB) of the child after open + one search, with this
                                     store / an empty one; rss_anon_mb, rss_file_mb split rss_mb
  peers     the floors the store's figures sit on, measured side by side in the same folder:
            fsync_ms (4 KiB write + fsync) and sqlite_commit_1_ms (a one-row transaction, same
            pragmas), each timed in turn with add_1's calls; sqlite_ingest_items_per_s (one
            batch's rows, already made, by one executemany into an empty database of the
            store's schema); view_search_p50_ms (the view's search alone: codes, no metadata)
  ratios    add_1_ms / sqlite_commit_1_ms, ingest / sqlite ingest, search p99 ingest / idle,
            search p50 idle / view_search_p50_ms (what the metadata read adds)
  targets   each target of the issue: value, limit, op, target_n (the scale it is set for), pass
  notes     how the figures were made

Over 400 lines because the keys above are one benchmark's parts, each a small function, and its
synthetic items and captions are the ones the other benchmarks draw on (bench/filters.py,
local.py, milvus_writes.py, service.py, text_path.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InputError
from indexes.codes import n_words, padding_mask
from indexes.hamming import HammingIndex
from store import metadata as md
from store.backend import ItemStore
from store.compaction import Compactor, compact_once
from store.manifest import Manifest
from store.rows import NewItems
from store.store import DB_NAME, SEGMENTS_DIR, STORE_DIR, Store

logger = logging.getLogger(__name__)

K = 10  # neighbours per search
TRICKLE_ITEMS = 100  # items per add of the thread that ingests during searches
TRICKLE_EVERY_S = 0.1  # and how often it adds them
PEER_QUERIES = 200  # one-query searches of the view alone (codes, no metadata)
SEARCH_ROUNDS = 4  # idle and during-ingest searches alternate in this many rounds
CAPTION_POOL = 1 << 16  # distinct captions the items draw from
PROJECT = Path(__file__).resolve().parents[1]  # for the child processes' imports

KINDS = ("sun", "moon", "tree", "house", "car", "boat", "balloon", "fish", "flower", "star")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "black")
SIZES = ("large", "small")
PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")
BACKGROUNDS = ("under a blue sky", "on green grass", "by the sea", "in the night", "at sunset")


def random_codes(rng: np.random.Generator, n: int, n_bits: int) -> np.ndarray:
    """(n, n_words) uint64 uniformly random codes (as bench/index.py's, whose module
    imports faiss: the child processes import what a server imports and no more)."""
    words = n_words(n_bits)
    codes = np.frombuffer(rng.bytes(n * words * 8), dtype=np.uint64).reshape(n, words).copy()
    codes[:, -1] &= ~padding_mask(n_bits)
    return codes


def captions(rng: np.random.Generator, count: int) -> list[str]:
    """Demo-like captions: one to three "a <size> <colour> <kind> <place>" phrases and a scene."""
    objects = rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2], size=count).tolist()
    words = [SIZES, COLOURS, KINDS, PLACES]
    picks = rng.integers(0, [len(w) for w in words], size=(count, 3, len(words))).tolist()
    scenes = rng.integers(0, len(BACKGROUNDS), size=count).tolist()
    out = []
    for k, row, scene in zip(objects, picks, scenes, strict=True):
        phrases = [f"a {SIZES[s]} {COLOURS[c]} {KINDS[i]} {PLACES[p]}" for s, c, i, p in row[:k]]
        head = phrases[0] if k == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        out.append(f"{head}, {BACKGROUNDS[scene]}")
    return out


@functools.cache
def caption_pool() -> np.ndarray:
    """(CAPTION_POOL,) object array of seeded captions that items draw from (making one per
    item would take as long as the store's add of it)."""
    return np.array(captions(np.random.default_rng(7), CAPTION_POOL), dtype=object)


def synthetic_items(rng: np.random.Generator, first_id: int, count: int, n_bits: int) -> NewItems:
    """`count` items with ids first_id.. (ints), random codes, captions and image paths."""
    ids = range(first_id, first_id + count)
    return NewItems(
        ids=ids,
        texts=caption_pool()[rng.integers(0, CAPTION_POOL, count)].tolist(),
        images=[f"images/{i}.jpg" for i in ids],
        image_codes=random_codes(rng, count, n_bits),
        text_codes=random_codes(rng, count, n_bits),
    )


def _median_ms(calls: Sequence[Callable[[], object]]) -> float:
    """Median milliseconds of each call, timed alone."""
    return _medians_ms(calls)[0]


def _medians_ms(*columns: Sequence[Callable[[], object]]) -> list[float]:
    """Median milliseconds of each column's calls, the columns' calls taken in turn (row by
    row), so a drift in the machine's disk or CPU falls on every column alike."""
    seconds = np.empty((len(columns[0]), len(columns)))
    for row, calls in enumerate(zip(*columns, strict=True)):
        for column, call in enumerate(calls):
            start = time.perf_counter()
            call()
            seconds[row, column] = time.perf_counter() - start
    return [float(x) for x in np.median(seconds, axis=0) * 1e3]


def _build(store: Store, rng: np.random.Generator, *, n: int, batch: int) -> float:
    """Fill the store with n items in `batch`-item adds; the seconds spent inside store.add."""
    spent = 0.0
    for first in range(0, n, batch):
        items = synthetic_items(rng, first, min(batch, n - first), store.n_bits)
        start = time.perf_counter()
        store.add(items)
        spent += time.perf_counter() - start
        done = first + len(items)
        logger.info("ingested %d / %d items (%.0f items/s in add)", done, n, done / spent)
    return spent


def _search_ms(store: ItemStore, queries: np.ndarray) -> np.ndarray:
    """(m,) milliseconds of one-query text->image searches, one per row of queries (either
    backend: bench/milvus_writes.py times MilvusStore with it too)."""
    out = np.empty(len(queries))
    for i in range(len(queries)):
        start = time.perf_counter()
        store.search("image", queries[i : i + 1], K)
        out[i] = time.perf_counter() - start
    return out * 1e3


class _Trickle(threading.Thread):
    """Adds TRICKLE_ITEMS new items every TRICKLE_EVERY_S (at once when it falls behind)."""

    def __init__(self, store: Store, rng: np.random.Generator, first_id: int) -> None:
        super().__init__(name="bench-trickle", daemon=True)
        self.store, self.rng, self.next_id = store, rng, first_id
        self.added = 0
        self.first_added = threading.Event()
        self.halt = threading.Event()
        self.seconds = 0.0
        self.error: BaseException | None = None  # what stopped it, re-raised by the caller

    def run(self) -> None:
        start = due = time.perf_counter()
        try:
            while not self.halt.is_set():
                items = synthetic_items(self.rng, self.next_id, TRICKLE_ITEMS, self.store.n_bits)
                self.store.add(items)
                self.next_id += TRICKLE_ITEMS
                self.added += TRICKLE_ITEMS
                self.first_added.set()
                due += TRICKLE_EVERY_S
                self.halt.wait(max(0.0, due - time.perf_counter()))
        except BaseException as err:  # handed to the searching thread
            self.error = err
        finally:
            self.seconds = time.perf_counter() - start
            self.first_added.set()


def _search_while_ingesting(
    store: Store, queries: np.ndarray, rng: np.random.Generator, first_id: int
) -> tuple[np.ndarray, _Trickle]:
    """Search ms with a _Trickle thread adding meanwhile, and the stopped thread (its counts)."""
    trickle = _Trickle(store, rng, first_id)
    trickle.start()
    trickle.first_added.wait()
    try:
        ms = _search_ms(store, queries)
    finally:
        trickle.halt.set()
        trickle.join()
    if trickle.error is not None:
        raise trickle.error
    return ms, trickle


def _disk_bytes(artifacts: Path) -> dict[str, int]:
    """Bytes of the store's database, WAL, shared memory and segment files."""
    root = artifacts / STORE_DIR
    db = root / DB_NAME
    sizes = {"db": 0, "wal": 0, "shm": 0, "segments": 0}
    for kind, path in (("db", db), ("wal", Path(f"{db}-wal")), ("shm", Path(f"{db}-shm"))):
        sizes[kind] = path.stat().st_size if path.is_file() else 0
    sizes["segments"] = sum(p.stat().st_size for p in (root / SEGMENTS_DIR).iterdir())
    return sizes


def _ingest_peer(folder: Path, rows: list[tuple[Any, ...]]) -> float:
    """Items/s of one executemany of the rows into an empty database of the store's schema."""
    folder.mkdir(parents=True, exist_ok=True)
    conn = md.connect(folder / "ingest.sqlite")
    md.init_schema(conn)
    start = time.perf_counter()
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    rate = len(rows) / (time.perf_counter() - start)
    conn.close()
    return rate


def _with_peers(calls: Sequence[Callable[[], object]], folder: Path) -> list[float]:
    """Medians of the calls, of a 4 KiB write + fsync and of a one-row SQLite transaction (the
    store's pragmas), each peer timed in turn with a call, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    conn = md.connect(folder / "commit.sqlite")
    conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, code BLOB NOT NULL)")
    block = b"\0" * 4096
    with (folder / "fsync.bin").open("wb") as f:
        fsyncs = [partial(_write_fsync, f.fileno(), block)] * len(calls)
        commits = [partial(_commit_one, conn, i) for i in range(len(calls))]
        medians = _medians_ms(calls, fsyncs, commits)
    conn.close()
    return medians


def _write_fsync(fd: int, block: bytes) -> None:
    os.write(fd, block)
    os.fsync(fd)


def _commit_one(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t VALUES (?, ?)", (seq, b"\0" * 16))
    conn.execute("COMMIT")


def _rows_of(items: NewItems) -> list[tuple[Any, ...]]:
    """The items as rows of the store's `items` table (what the store inserts, CRC left 0)."""
    added = time.time()
    codes = zip(items.image_codes.view(np.uint8), items.text_codes.view(np.uint8), strict=True)
    return [
        (seq, item_id, text, image, added, "{}", ib.tobytes(), tb.tobytes(), 0)
        for seq, (item_id, text, image, (ib, tb)) in enumerate(
            zip(items.ids, items.texts, items.images, codes, strict=True)
        )
    ]


def _status_mib(field: str) -> float:
    """A /proc/self/status field (kB) in MiB."""
    status = Path("/proc/self/status")
    if not status.is_file():
        raise InputError("expected /proc/self/status (Linux) to read the RSS, found none")
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise InputError(f"expected {field} in /proc/self/status, found none")


def child_main() -> None:
    """In a fresh process: open argv[1]'s store, search once, write timings and RSS to argv[3]."""
    artifacts, n_bits, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    query = random_codes(np.random.default_rng(1), 1, n_bits)
    warm = HammingIndex(n_bits)  # loads the numba kernels, as a server's warm-up would
    warm.add(query, np.zeros(1, np.int64))
    warm.search(query, K)
    start = time.perf_counter()
    store = Store.open(artifacts)
    opened = time.perf_counter()
    store.search("image", query, K)
    searched = time.perf_counter()
    result = {
        "open_s": opened - start,
        "startup_s": searched - start,
        "rss_mb": _status_mib("VmRSS"),
        "rss_anon_mb": _status_mib("RssAnon"),
        "rss_file_mb": _status_mib("RssFile"),
    }
    store.close()
    out.write_text(json.dumps(result))


def _probe(artifacts: Path, n_bits: int, repeats: int) -> dict[str, float]:
    """Medians over `repeats` fresh child processes of child_main's figures, and their wall."""
    code = "from bench.writes import child_main; child_main()"
    out = artifacts.parent / f"{artifacts.name}-probe.json"
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])
    }
    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        start = time.perf_counter()
        args = [sys.executable, "-c", code, str(artifacts), str(n_bits), str(out)]
        done = subprocess.run(args, cwd=PROJECT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise InputError(
                f"expected the probe of {artifacts} to succeed, got: {done.stderr[-2000:]}"
            )
        runs.append(json.loads(out.read_text()) | {"process_s": wall})
    out.unlink()
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0]}


def sources_digest() -> str:
    """SHA-256 of the store package's modules (this one aside): the code being measured."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name != Path(__file__).name:
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _target(value: float, limit: float, op: str, target_n: int) -> dict[str, Any]:
    passed = value <= limit if op == "<=" else value >= limit
    return {"value": value, "limit": limit, "op": op, "target_n": target_n, "pass": passed}


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it passes."""
    return {
        "add_1_ms": _target(result["add_1_ms"], 20.0, "<=", 1_000_000),
        "delete_1_ms": _target(result["delete_1_ms"], 10.0, "<=", 1_000_000),
        "startup_s": _target(result["startup_s"], 5.0, "<=", 10_000_000),
        "rss_above_empty_mb": _target(
            result["rss_mb"] - result["rss_empty_mb"], 1024.0, "<=", 10_000_000
        ),
        "search_p99_ingest_over_idle": _target(
            result["ratios"]["search_p99_ingest_over_idle"], 2.0, "<=", 1_000_000
        ),
        "ingest_items_per_s": _target(result["ingest_items_per_s"], 100_000.0, ">=", 1_000_000),
    }


def check_sizes(*, n: int, n_bits: int, repeats: int, batch: int, queries: int) -> None:
    """InputError unless the sizes leave existing ids for every timed delete."""
    for name, value in (("repeats", repeats), ("batch", batch), ("queries", queries)):
        if value < 1:
            raise InputError(f"expected {name} >= 1, got {value}")
    if n < 1001 * repeats + 2:
        raise InputError(f"expected n >= {1001 * repeats + 2} for {repeats} repeats, got {n}")
    n_words(n_bits)  # refuses a bad code length


def _time_writes(
    store: Store, rng: np.random.Generator, *, n: int, repeats: int, next_id: int, peers: Path
) -> tuple[dict[str, float], int]:
    """add_1/1000 and delete_1/1000 medians (one untimed warm-up each), the fsync and one-row
    SQLite commit peers taken in turn with add_1 (files in `peers`), and the next free id."""
    out = {}
    for size in (1, 1000):
        store.add(synthetic_items(rng, next_id, size, store.n_bits))  # warm-up: not timed
        next_id += size
        adds = [
            synthetic_items(rng, next_id + r * size, size, store.n_bits) for r in range(repeats)
        ]
        next_id += repeats * size
        if size == 1:
            out["add_1_ms"], out["fsync_ms"], out["sqlite_commit_1_ms"] = _with_peers(
                [partial(store.add, items) for items in adds], peers
            )
        else:
            out["add_1000_ms"] = _median_ms([partial(store.add, items) for items in adds])
    victims = rng.permutation(n)[: 1 + 1001 * repeats].tolist()  # ids 0..n-1: all in segments
    store.delete(victims[:1])  # warm-up: not timed
    singles = [[victims[1 + r]] for r in range(repeats)]
    out["delete_1_ms"] = _median_ms([partial(store.delete, ids) for ids in singles])
    rest = victims[1 + repeats :]
    groups = [rest[r * 1000 : (r + 1) * 1000] for r in range(repeats)]
    out["delete_1000_ms"] = _median_ms([partial(store.delete, ids) for ids in groups])
    return out, next_id


def _time_searches(
    store: Store, rng: np.random.Generator, *, queries: int, next_id: int
) -> dict[str, float]:
    """Search latency percentiles idle and during ingest, in alternating rounds (so drifts in a
    shared machine's load fall on both), and the view's own latency."""
    qs = random_codes(rng, queries, store.n_bits)
    _search_ms(store, qs[: min(queries, 20)])  # warm-up: kernels, the reader's connection
    idle, during, added, seconds = [], [], 0, 0.0
    for chunk in np.array_split(qs, min(SEARCH_ROUNDS, queries)):
        idle.append(_search_ms(store, chunk))
        ms, trickle = _search_while_ingesting(store, chunk, rng, next_id)
        during.append(ms)
        next_id, added, seconds = trickle.next_id, added + trickle.added, seconds + trickle.seconds
    codes_only = []
    for i in range(min(queries, PEER_QUERIES)):
        begin = time.perf_counter()
        store.view().search("image", qs[i : i + 1], K)
        codes_only.append(time.perf_counter() - begin)
    p_idle = np.percentile(np.concatenate(idle), [50, 99])
    p_during = np.percentile(np.concatenate(during), [50, 99])
    return {
        "search_p50_idle_ms": float(p_idle[0]),
        "search_p99_idle_ms": float(p_idle[1]),
        "search_p50_ingest_ms": float(p_during[0]),
        "search_p99_ingest_ms": float(p_during[1]),
        "ingest_during_search_items_per_s": added / seconds,
        "view_search_p50_ms": float(np.median(codes_only) * 1e3),
    }


def bench_writes(
    *,
    root: Path,
    n: int,
    n_bits: int = 64,
    repeats: int = 5,
    batch: int = 100_000,
    queries: int = 2000,
) -> dict[str, Any]:
    """Build an n-item store under root (an empty folder) and measure it: the documented JSON."""
    check_sizes(n=n, n_bits=n_bits, repeats=repeats, batch=batch, queries=queries)
    code = sources_digest()
    rng = np.random.default_rng(0)
    manifest = Manifest(n_bits, "synthetic", "", "", time.time())
    Store.create(root / "empty", manifest).close()
    store = Store.create(root / "items", manifest)
    ingest_s = _build(store, rng, n=n, batch=batch)
    result: dict[str, Any] = {"n": n, "bits": n_bits, "batch": batch, "repeats": repeats}
    result["store_sha256"] = code
    result |= {"queries": queries, "python": platform.python_version(), "threads": os.cpu_count()}
    result |= {"ingest_items_per_s": n / ingest_s, "ingest_s": ingest_s}
    rows = _rows_of(synthetic_items(rng, 0, min(batch, n), n_bits))
    peers = {"sqlite_ingest_items_per_s": _ingest_peer(root / "peers", rows)}
    result["segments"] = len(store.view().parts)
    start = time.perf_counter()
    while compact_once(store):
        pass
    result["compaction_s"] = time.perf_counter() - start
    result["segments_compacted"] = len(store.view().parts)
    disk = _disk_bytes(root / "items")
    result |= {"disk_bytes_per_item": sum(disk.values()) / n, "disk_bytes": disk}
    logger.info("built %d items in %.1f s; %s bytes on disk", n, ingest_s, disk)
    Compactor(store)  # as a server runs; store.close() stops it
    writes, next_id = _time_writes(
        store, rng, n=n, repeats=repeats, next_id=n, peers=root / "peers"
    )
    peers |= {key: writes.pop(key) for key in ("fsync_ms", "sqlite_commit_1_ms")}
    result |= writes
    logger.info("timed adds and deletes; searching %d queries idle and during ingest", queries)
    searches = _time_searches(store, rng, queries=queries, next_id=next_id)
    peers["view_search_p50_ms"] = searches.pop("view_search_p50_ms")
    result |= searches
    result["growing_rows"] = sum(len(p.seqs) for p in store.view().parts if p.name == "growing")
    store.close()
    if sources_digest() != code:  # the children would run other code than the one that wrote
        raise InputError("expected store/*.py to stay unchanged during the benchmark, they changed")
    logger.info("probing startup and memory in %d fresh processes per store", repeats)
    full, empty = _probe(root / "items", n_bits, repeats), _probe(root / "empty", n_bits, repeats)
    result |= {"startup_s": full["startup_s"], "startup_process_s": full["process_s"]}
    result |= {"open_s": full["open_s"], "rss_mb": full["rss_mb"], "rss_empty_mb": empty["rss_mb"]}
    result |= {"rss_anon_mb": full["rss_anon_mb"], "rss_file_mb": full["rss_file_mb"]}
    result["peers"] = peers
    result["ratios"] = {
        "add_1_over_sqlite_commit_1": result["add_1_ms"] / peers["sqlite_commit_1_ms"],
        "ingest_over_sqlite_ingest": result["ingest_items_per_s"]
        / peers["sqlite_ingest_items_per_s"],
        "search_p99_ingest_over_idle": result["search_p99_ingest_ms"]
        / result["search_p99_idle_ms"],
        "search_p50_idle_over_view_search": result["search_p50_idle_ms"]
        / peers["view_search_p50_ms"],
    }
    result["targets"] = targets(result)
    result["notes"] = (
        f"store built by store.add in batches of {batch} (ids 0..n-1), then compacted; the "
        "ingest peer measured right after the build, the fsync and commit peers in turn with "
        "add_1, all in the benchmark folder; timed adds, deletes and searches "
        f"with a Compactor running; searches are single text->image queries, k={K}, idle and "
        f"during ingest in {SEARCH_ROUNDS} alternating rounds; during ingest a thread adds "
        f"{TRICKLE_ITEMS} items every {TRICKLE_EVERY_S} s in the same process; startup_s and RSS "
        "in fresh child processes, warm page cache (the files were just written); RSS in MiB; "
        "disk on the filesystem of the benchmark folder"
    )
    return result
