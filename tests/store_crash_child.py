"""The child that tests/test_store_crash.py kills, and the log replay both sides share.

Run as `python tests/store_crash_child.py ARTIFACTS LOG SEED`: the child opens the store in
ARTIFACTS (creating it when missing) and then writes for ever, seeded by SEED, until it is
killed. Before each call it appends {"begin": n, "op": ...} to LOG, and once the call has
returned {"ack": n}; every line is flushed and fsynced before the next step. The parent settles
an op the kill left in flight by appending {"resolved": n, "applied": bool}, so the log replays
to exactly what the store must hold. The store's seal rows, bulk rows and merge factor (its
StoreConfig) come from the environment (CMH_CRASH_SEAL_ROWS, CMH_CRASH_BULK_ROWS,
CMH_CRASH_MERGE_FACTOR).

With CMH_CRASH_CHILDREN=C and CMH_CRASH_CHILD=c, C children write to one store at once, each
opening it shared (as the workers of one server do), each with its own log and its own ids
(`fresh_id(n * C + c)`), so that every child's log replays to its own part of the store.

Every item's content is a function of its id and its version (the number of the op that wrote
it), so the parent recomputes codes, caption, fields and image from the log alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from common.errors import InputError
from store.compaction import Compactor, compact_once
from store.config import StoreConfig
from store.ids import ItemId
from store.manifest import Manifest
from store.rows import IMAGES_DIR, NewItems
from store.store import Store

N_BITS = 64
POOL = 32  # distinct codes per modality: ties everywhere
MANIFEST = Manifest(
    n_bits=N_BITS,
    image_backbone="crash-test",
    vocabulary_sha256="4" * 64,
    checkpoint_sha256="5" * 64,
    created=0.0,
)
CODE_POOL = np.random.default_rng(2026).integers(0, 2**64, (2, POOL, 1), dtype=np.uint64)
Op = dict[str, Any]


def fresh_id(n: int) -> ItemId:
    """The n-th id ever handed out: integers, file names and digit strings with a leading 0."""
    return (n, f"IMG_{n}.jpg", f"0{n}")[n % 3]


CHILDREN = int(os.environ.get("CMH_CRASH_CHILDREN", "1"))  # children writing at once
CHILD = int(os.environ.get("CMH_CRASH_CHILD", "0"))  # this child's number among them


def child_id(n: int, child: int = CHILD, children: int = CHILDREN) -> ItemId:
    """The n-th id a child hands out: disjoint from every other child's."""
    return fresh_id(n * children + child)


def codes_of(item_id: ItemId, version: int) -> tuple[np.ndarray, np.ndarray]:
    """(image code, text code), each (1,) uint64, of an item as written by op `version`."""
    digest = hashlib.sha256(f"{item_id!r}/{version}".encode()).digest()
    return CODE_POOL[0, digest[0] % POOL], CODE_POOL[1, digest[1] % POOL]


def text_of(item_id: ItemId, version: int) -> str:
    return f"caption of {item_id!r}, version {version} ✓"


def fields_of(item_id: ItemId, version: int) -> dict[str, Any]:
    return {"version": version, "id": str(item_id), "odd": version % 2 == 1}


def image_data_of(version: int) -> tuple[bytes, str] | None:
    """Bytes for the store to keep (shared by every item of a batch), or None for a path."""
    return None if version % 3 else (f"picture {version % 5}".encode(), "png")


def image_of(item_id: ItemId, version: int) -> str:
    """Where the item's image is, relative to the artifacts folder."""
    data = image_data_of(version)
    if data is None:
        return f"demo/{item_id}.jpg"
    return f"{IMAGES_DIR}/{hashlib.sha256(data[0]).hexdigest()}.{data[1]}"


@dataclass
class Model:
    """What the log says the store holds."""

    items: dict[ItemId, int] = field(default_factory=dict)  # id -> version, in insertion order
    deleted: set[ItemId] = field(default_factory=set)  # ids whose delete was acknowledged
    next_id: int = 0  # fresh_id(next_id) has never been handed out
    next_op: int = 0

    def copy(self) -> Model:
        return Model(dict(self.items), set(self.deleted), self.next_id, self.next_op)


def begin(model: Model, op: Op) -> None:
    """Count an op as begun: its number and its fresh ids are used up, whatever happens."""
    model.next_op = op["begin"] + 1
    model.next_id = max(model.next_id, op.get("fresh", 0))


def apply(model: Model, op: Op) -> None:
    """What an op does once it has happened."""
    if op["op"] == "add":
        for item_id in op["ids"]:
            model.items.pop(item_id, None)  # a replaced item counts as inserted now
            model.items[item_id] = op["begin"]
            model.deleted.discard(item_id)
    elif op["op"] == "delete":
        for item_id in op["ids"]:
            model.items.pop(item_id, None)
            model.deleted.add(item_id)
    # "compact" and "refused" change no item


def read_log(path: Path) -> list[str]:
    """The log's complete lines (a line the kill cut short is left out)."""
    return path.read_text("utf-8").split("\n")[:-1]


def replay(lines: list[str]) -> tuple[Model, Op | None]:
    """(the model of every acknowledged or settled op, the op in flight or None)."""
    model, pending = Model(), None
    for line in lines:
        entry = json.loads(line)
        if "begin" in entry:
            assert pending is None, f"op {entry['begin']} began while {pending} was in flight"
            pending = entry
            begin(model, entry)
        elif "ack" in entry or "resolved" in entry:
            number = entry["ack"] if "ack" in entry else entry["resolved"]
            assert pending is not None and pending["begin"] == number, (entry, pending)
            if entry.get("applied", True):
                apply(model, pending)
            pending = None
    return model, pending


def plan(rng: random.Random, model: Model, *, bulk: int) -> Op:
    """The next op: adds of 1, tens or a bulk's worth, replaces, deletes, refusals, merges."""
    live, n = list(model.items), model.next_op
    roll = rng.random()
    if roll < 0.4 or len(live) < 20:
        size = 1 if rng.random() < 0.4 else rng.randint(2, 40)
        if rng.random() < 0.12:
            size = rng.randint(bulk, bulk + 30)
        ids = [child_id(i) for i in range(model.next_id, model.next_id + size)]
        return {
            "begin": n,
            "op": "add",
            "ids": ids,
            "replace": False,
            "fresh": model.next_id + size,
        }
    if roll < 0.55:
        size = rng.randint(bulk, bulk + 10) if rng.random() < 0.15 else rng.randint(1, 12)
        old = rng.sample(live, min(len(live), size - size // 4))
        new = [child_id(i) for i in range(model.next_id, model.next_id + size // 4)]
        fresh = model.next_id + size // 4
        return {"begin": n, "op": "add", "ids": old + new, "replace": True, "fresh": fresh}
    if roll < 0.8:
        size = rng.randint(100, 300) if len(live) > 1200 else rng.randint(1, 30)
        return {"begin": n, "op": "delete", "ids": rng.sample(live, min(size, len(live) - 5))}
    if roll < 0.86:
        size = rng.choice([1, 5, bulk])
        new = [child_id(i) for i in range(model.next_id, model.next_id + size)]
        clash = rng.choice([new[0], rng.choice(live)])  # repeated in the batch, or stored
        fresh = model.next_id + size
        return {"begin": n, "op": "refused", "ids": [*new, clash], "fresh": fresh}
    return {"begin": n, "op": "compact", "force": rng.random() < 0.3}


def batch_of(op: Op, rng: random.Random) -> NewItems:
    """The op's items, integer ids sometimes given as decimal strings (the same ids)."""
    ids, version = op["ids"], op["begin"]
    codes = [codes_of(i, version) for i in ids]
    return NewItems(
        ids=[str(i) if isinstance(i, int) and rng.random() < 0.5 else i for i in ids],
        texts=[text_of(i, version) for i in ids],
        images=[f"demo/{i}.jpg" for i in ids],
        image_codes=np.stack([c[0] for c in codes]),
        text_codes=np.stack([c[1] for c in codes]),
        fields=[fields_of(i, version) for i in ids],
        image_data=[image_data_of(version)] * len(ids),
    )


def run(store: Store, op: Op, rng: random.Random) -> None:
    if op["op"] == "add":
        store.add(batch_of(op, rng), on_conflict="replace" if op["replace"] else "error")
    elif op["op"] == "delete":
        store.delete(
            [str(i) if isinstance(i, int) and rng.random() < 0.5 else i for i in op["ids"]]
        )
    elif op["op"] == "refused":
        try:
            store.add(batch_of(op, rng))
        except InputError:
            return
        raise SystemExit(f"op {op['begin']}: a batch with a repeated or stored id was accepted")
    else:
        compact_once(store, force=op["force"])


def note(log: TextIO, entry: dict[str, Any]) -> None:
    """One durable log line."""
    log.write(json.dumps(entry) + "\n")
    log.flush()
    os.fsync(log.fileno())


def main(artifacts: Path, log_path: Path, seed: int) -> None:
    config = StoreConfig(
        seal_rows=int(os.environ["CMH_CRASH_SEAL_ROWS"]),
        bulk_rows=int(os.environ["CMH_CRASH_BULK_ROWS"]),
        merge_factor=int(os.environ["CMH_CRASH_MERGE_FACTOR"]),
    )
    model, pending = replay(read_log(log_path))
    if pending is not None:
        raise SystemExit(f"op {pending['begin']} was left in flight by the parent")
    rng = random.Random(seed)
    with log_path.open("a", encoding="utf-8") as log:
        constants = [config.seal_rows, config.bulk_rows, config.merge_factor]
        note(log, {"ready": os.getpid(), "constants": constants})
        if CHILDREN > 1:  # the parent made the store
            store = Store.open(artifacts, expected=MANIFEST, shared=True, config=config)
        elif Store.exists(artifacts):
            store = Store.open(artifacts, expected=MANIFEST, config=config)
        else:
            store = Store.create(artifacts, MANIFEST, config=config)
        if rng.random() < 0.5:
            Compactor(store)  # merges in the background too, killed wherever it is
        while True:
            op = plan(rng, model, bulk=config.bulk_rows)
            note(log, op)
            begin(model, op)
            run(store, op, rng)
            note(log, {"ack": op["begin"]})
            apply(model, op)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
