"""kill -9 at seeded random moments: no acknowledged write is lost, no batch is half there, and
the store always opens, with exact searches.

A child process (tests/store_crash_child.py) writes to a store for ever, logging each op before
it is called and acknowledging it once it has returned; the parent SIGKILLs it after a seeded
random delay, reopens the store and checks it against the log's replay: every acknowledged add
present with its exact caption, image, fields and codes (searches equal a brute-force oracle,
ties in insertion order), every acknowledged delete gone, and the one op in flight either wholly
done or not at all. Then a new child carries on in the same folder.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from store_crash_child import (
    CODE_POOL,
    MANIFEST,
    Model,
    Op,
    apply,
    child_id,
    codes_of,
    fields_of,
    fresh_id,
    image_data_of,
    image_of,
    read_log,
    replay,
    text_of,
)

from store.config import StoreConfig
from store.ids import ItemId
from store.rows import IMAGES_DIR
from store.store import SEGMENTS_DIR, STORE_DIR, Store
from store.view import Target

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "store_crash_child.py"
KILLS = 22
SEAL, BULK, FACTOR = 48, 40, 4  # many seals, bulk segments and merges in a few thousand rows
# The parent opens the store as the children do.
CONFIG = StoreConfig(seal_rows=SEAL, bulk_rows=BULK, merge_factor=FACTOR)
TARGETS: tuple[Target, ...] = ("image", "text")
QUERIES = {  # three pooled codes (distance-0 ties) and two others, per target
    "image": np.concatenate([CODE_POOL[0, :3], np.array([[0], [2**64 - 1]], np.uint64)]),
    "text": np.concatenate([CODE_POOL[1, :3], np.array([[0x5555_5555_5555_5555], [7]], np.uint64)]),
}


def brute_force(
    model: Model, target: Target, queries: np.ndarray, k: int
) -> list[list[tuple[ItemId, int]]]:
    """Every live code's popcount distance, sorted by (distance, insertion order)."""
    ids = list(model.items)
    if not ids:
        return [[] for _ in queries]
    column = TARGETS.index(target)
    codes = np.stack([codes_of(i, model.items[i])[column] for i in ids])  # (n, 1)
    dists = np.bitwise_count(queries[:, None, :] ^ codes[None]).sum(axis=2)  # (m, n)
    order = np.arange(len(ids))
    return [[(ids[j], int(row[j])) for j in np.lexsort((order, row))[:k]] for row in dists]


def held(store: Store, ids: list[ItemId]) -> dict[ItemId, int]:
    """id -> version of those of ids the store holds."""
    items = (store.get(i) for i in ids)
    return {item.id: item.fields["version"] for item in items if item is not None}


def check_store(store: Store, model: Model, artifacts: Path) -> None:
    """The store holds exactly the model: ids, metadata, images, codes, order; no leftovers."""
    every_id = [fresh_id(i) for i in range(model.next_id)]
    assert store.existing(every_id) == set(model.items)  # nothing of a refused or undone op
    assert store.existing(list(model.deleted)) == set()
    assert len(store) == len(model.items)
    for item_id, version in model.items.items():
        item = store.get(item_id)
        assert item is not None and type(item.id) is type(item_id)
        assert (item.text, item.image, item.fields) == (
            text_of(item_id, version),
            image_of(item_id, version),
            fields_of(item_id, version),
        )
        data = image_data_of(version)
        if data is not None:
            assert (artifacts / item.image).read_bytes() == data[0]
    for target in TARGETS:
        for k in (10, len(model.items) + 3):
            found = [
                [(item.id, d) for item, d in row]
                for row in store.search(target, QUERIES[target], k).hits
            ]
            assert found == brute_force(model, target, QUERIES[target], k), (target, k)
    store.collect_orphan_images()  # what a crash left unreferenced; then exactly the referenced
    referenced = {image_of(i, v) for i, v in model.items.items() if image_data_of(v)}
    images = artifacts / IMAGES_DIR
    stored = {f"{IMAGES_DIR}/{p.name}" for p in images.iterdir()} if images.is_dir() else set()
    assert stored == referenced
    segment_files = {p.name for p in (artifacts / STORE_DIR / SEGMENTS_DIR).iterdir()}
    assert segment_files == {p.name for p in store.view().parts if p.name != "growing"}


def settle(artifacts: Path, log_path: Path) -> tuple[Op | None, bool]:
    """Check the killed child's store against its log; log the fate of the op in flight.

    Returns (the op in flight or None, whether it had happened).
    """
    lines = read_log(log_path)
    log_path.write_text("".join(line + "\n" for line in lines), "utf-8")  # drop a cut line
    before, pending = replay(lines)
    happened = False
    if not Store.exists(artifacts):  # killed while the first child made the store
        assert not before.items and pending is None, pending
    else:
        after = before.copy()
        if pending is not None:
            apply(after, pending)
        store = Store.open(artifacts, expected=MANIFEST, config=CONFIG)
        try:
            candidates = list(dict.fromkeys([*before.items, *after.items]))
            holds = held(store, candidates)
            lost = [i for i in before.items if holds.get(i) != before.items[i]]
            extra = [i for i in holds if i not in before.items]
            assert holds in (before.items, after.items), (
                f"with op {pending} in flight, the store holds neither the acknowledged state "
                f"nor the state after that op: {lost[:10]} differ or are missing, "
                f"{extra[:10]} were never acknowledged"
            )
            happened = holds == after.items and holds != before.items
            check_store(store, after if happened else before, artifacts)
        finally:
            store.close()
    if pending is None:
        return None, False
    with log_path.open("a", encoding="utf-8") as log:
        log.write(json.dumps({"resolved": pending["begin"], "applied": happened}) + "\n")
    return pending, happened


def wait_ready(child: subprocess.Popen[bytes], log_path: Path, errors: Path) -> list[int]:
    """Until the child has logged that it is up (imports done); the constants it patched."""
    deadline = time.monotonic() + 120
    while True:
        for line in read_log(log_path):
            entry = json.loads(line)
            if entry.get("ready") == child.pid:
                return list(entry["constants"])
        assert child.poll() is None, errors.read_text()
        assert time.monotonic() < deadline, "the child did not start within 120 s"
        time.sleep(0.01)


def segment_names(artifacts: Path) -> set[str]:
    folder = artifacts / STORE_DIR / SEGMENTS_DIR
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_no_acknowledged_write(
    tmp_path: Path,
) -> None:
    artifacts, log_path, errors = tmp_path / "artifacts", tmp_path / "ops.log", tmp_path / "err"
    log_path.touch()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CMH_CRASH_SEAL_ROWS": str(SEAL),
        "CMH_CRASH_BULK_ROWS": str(BULK),
        "CMH_CRASH_MERGE_FACTOR": str(FACTOR),
    }
    rng = random.Random(20261201)
    in_flight: Counter[str] = Counter()
    known: set[str] = set()  # segment files as the parent left them
    made_by_children = 0  # segment files the children wrote (seals, bulk adds, merges)
    for _ in range(KILLS):
        with errors.open("wb") as stderr:
            child = subprocess.Popen(
                [
                    sys.executable,
                    str(CHILD),
                    str(artifacts),
                    str(log_path),
                    str(rng.getrandbits(32)),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
            try:
                assert wait_ready(child, log_path, errors) == [SEAL, BULK, FACTOR]
                time.sleep(rng.uniform(0.05, 1.5))
                assert child.poll() is None, errors.read_text()
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait()
        made_by_children += len(segment_names(artifacts) - known)
        pending, happened = settle(artifacts, log_path)
        known = segment_names(artifacts)
        if pending is not None:
            kind = "replace" if pending.get("replace") else pending["op"]
            in_flight[f"{kind} {'done' if happened else 'not done'}"] += 1
    acknowledged: Counter[str] = Counter()
    ops = {}
    for line in read_log(log_path):
        entry = json.loads(line)
        if "begin" in entry:
            ops[entry["begin"]] = entry
        elif "ack" in entry:
            op = ops[entry["ack"]]
            acknowledged[op["op"]] += 1
            if op["op"] == "add":
                acknowledged["replace" if op["replace"] else "new"] += 1
                acknowledged["bulk"] += len(op["ids"]) >= BULK
    assert sum(in_flight.values()) >= KILLS // 2, in_flight  # most kills hit a write
    assert made_by_children >= 20  # the lowered constants took effect in the children
    kinds = ("new", "bulk", "replace", "delete", "refused", "compact")
    assert all(acknowledged[kind] >= 3 for kind in kinds), acknowledged


SHARED_ROUNDS = 8  # rounds of two children writing at once, both killed


def settle_shared(artifacts: Path, logs: list[Path]) -> tuple[Model, int]:
    """After both children were killed: each child's part of the store is its acknowledged
    state or that plus its op in flight; together they are the whole store, with exact
    searches in which each child's items keep their insertion order. Logs each op's fate.

    Returns (the union of the children's models, how many ops were in flight).
    """
    store = Store.open(artifacts, expected=MANIFEST, config=CONFIG)
    union, settled, in_flight = Model(), [], 0
    try:
        for child, log_path in enumerate(logs):
            lines = read_log(log_path)
            log_path.write_text("".join(line + "\n" for line in lines), "utf-8")
            before, pending = replay(lines)
            after = before.copy()
            if pending is not None:
                apply(after, pending)
            candidates = list(dict.fromkeys([*before.items, *after.items]))
            holds = held(store, candidates)
            assert holds in (before.items, after.items), (child, pending)
            happened = holds == after.items and holds != before.items
            model = after if happened else before
            settled.append((model, child))
            union.items.update(model.items)
            if pending is not None:
                in_flight += 1
                with log_path.open("a", encoding="utf-8") as log:
                    log.write(json.dumps({"resolved": pending["begin"], "applied": happened}))
                    log.write("\n")
        every_id = [
            child_id(i, child, len(logs)) for model, child in settled for i in range(model.next_id)
        ]
        assert store.existing(every_id) == set(union.items)
        assert len(store) == len(union.items)
        for item_id, version in union.items.items():
            item = store.get(item_id)
            assert item is not None and type(item.id) is type(item_id)
            assert (item.text, item.fields) == (
                text_of(item_id, version),
                fields_of(item_id, version),
            )
        for target in TARGETS:
            k = len(union.items) + 3
            found = [
                [(item.id, d) for item, d in row]
                for row in store.search(target, QUERIES[target], k).hits
            ]
            want = brute_force(union, target, QUERIES[target], k)  # ties: not a global order
            assert [sorted(row, key=repr) for row in found] == [
                sorted(row, key=repr) for row in want
            ]
            assert [[d for _, d in row] for row in found] == [[d for _, d in row] for row in want]
            for model, _ in settled:  # within one child, ties follow its insertion order
                mine = [[hit for hit in row if hit[0] in model.items] for row in found]
                assert mine == brute_force(model, target, QUERIES[target], k), target
        segment_files = {p.name for p in (artifacts / STORE_DIR / SEGMENTS_DIR).iterdir()}
        assert segment_files == {p.name for p in store.view().parts if p.name != "growing"}
    finally:
        store.close()
    return union, in_flight


@pytest.mark.slow
def test_two_processes_sharing_a_store_killed_at_random_moments_lose_nothing(
    tmp_path: Path,
) -> None:
    """Two children write at once to one store opened shared (the workers of one server): adds,
    replaces, bulk adds, deletes, seals and the one compacting child's merges interleave; both
    are SIGKILLed at seeded random moments, and every acknowledged write of each is there."""
    artifacts = tmp_path / "artifacts"
    Store.create(artifacts, MANIFEST, config=CONFIG).close()
    logs = [tmp_path / f"ops-{c}.log" for c in range(2)]
    for log_path in logs:
        log_path.touch()
    rng = random.Random(20261202)
    in_flight = 0
    union = Model()
    for _ in range(SHARED_ROUNDS):
        children: list[subprocess.Popen[bytes]] = []
        errors = [tmp_path / f"err-{c}" for c in range(2)]
        try:
            for c, (log_path, err) in enumerate(zip(logs, errors, strict=True)):
                env = {
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "CMH_CRASH_SEAL_ROWS": str(SEAL),
                    "CMH_CRASH_BULK_ROWS": str(BULK),
                    "CMH_CRASH_MERGE_FACTOR": str(FACTOR),
                    "CMH_CRASH_CHILDREN": "2",
                    "CMH_CRASH_CHILD": str(c),
                }
                with err.open("wb") as stderr:
                    children.append(
                        subprocess.Popen(
                            [sys.executable, str(CHILD), str(artifacts), str(log_path),
                             str(rng.getrandbits(32))],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                        )
                    )  # fmt: skip
            for child, log_path, err in zip(children, logs, errors, strict=True):
                assert wait_ready(child, log_path, err) == [SEAL, BULK, FACTOR]
            time.sleep(rng.uniform(0.3, 1.5))
            for child, err in zip(children, errors, strict=True):
                assert child.poll() is None, err.read_text()
                child.send_signal(signal.SIGKILL)
                child.wait()
                time.sleep(rng.uniform(0, 0.2))
        finally:
            for child in children:
                child.kill()
                child.wait()
        union, flying = settle_shared(artifacts, logs)
        in_flight += flying
    assert in_flight >= SHARED_ROUNDS // 2  # most kills hit a write
    assert len(union.items) > 200
