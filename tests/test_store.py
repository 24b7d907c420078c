"""The store on real files: exact searches equal to a brute-force oracle through adds, deletes,
replaces, seals, bulk segments, compaction and reopening; refused batches that change nothing;
ids, fields and images; a corrupt-file matrix; merges under concurrent searches and deletes.

CONFIG lowers the seal rows, bulk rows and merge factor (StoreConfig), so that a few thousand
rows make many segments, seals and merges (test_lowered_constants_reach_the_code_that_reads_them
checks that each lowered value is the one the code uses).

Over 400 lines because these are the store's direct tests, sharing one oracle, one fixture and
one set of builders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import store.store as store_module
from common.errors import InputError, IntegrityError
from indexes.codes import n_words, pack_codes
from indexes.results import PAD_DIST
from store import compaction
from store import metadata as md
from store.compaction import compact_once
from store.config import StoreConfig
from store.ids import ItemId, parse_id
from store.manifest import CHECKED_FIELDS, Manifest
from store.parts import Merge
from store.rows import IMAGES_DIR, NewItems
from store.segment import LAYOUT
from store.store import DB_NAME, SEGMENTS_DIR, STORE_DIR, Hits, Store
from store.view import Target
from tests.helpers import store_manifest

N_BITS = 72  # two words per code, the second with padding bits
SEAL = 64  # lowered seal_rows
BULK = 40  # lowered bulk_rows
FACTOR = 4  # lowered merge_factor
POOL = 40  # distinct codes per modality: many items share a code, so ties are everywhere
TARGETS: tuple[Target, ...] = ("image", "text")
MANIFEST = store_manifest(N_BITS)
_bits = np.random.default_rng(7).integers(0, 2, (2, POOL + 3, N_BITS))
IMAGE_POOL, TEXT_POOL = pack_codes(_bits[0, :POOL]), pack_codes(_bits[1, :POOL])
# per target: three pooled codes (distance-0 ties) and three codes from outside the pool
QUERIES = {
    "image": np.concatenate([IMAGE_POOL[:3], pack_codes(_bits[0, POOL:])]),
    "text": np.concatenate([TEXT_POOL[:3], pack_codes(_bits[1, POOL:])]),
}


# Seal at 64 rows, bulk segments from 40, merges of 4: seals, bulk segments and merges in a few
# hundred rows. Every store of these tests is opened with it.
CONFIG = StoreConfig(seal_rows=SEAL, bulk_rows=BULK, merge_factor=FACTOR)


class Folder:
    """An artifacts folder and the stores a test opened on it (closed at the test's end)."""

    def __init__(self, artifacts: Path) -> None:
        self.artifacts = artifacts
        self.opened: list[Store] = []

    @property
    def segments(self) -> Path:
        return self.artifacts / STORE_DIR / SEGMENTS_DIR

    @property
    def database(self) -> Path:
        return self.artifacts / STORE_DIR / DB_NAME

    def create(self) -> Store:
        self.opened.append(Store.create(self.artifacts, MANIFEST, config=CONFIG))
        return self.opened[-1]

    def open(self, expected: Manifest | None = MANIFEST) -> Store:
        self.opened.append(Store.open(self.artifacts, expected=expected, config=CONFIG))
        return self.opened[-1]

    def reopen(self, store: Store) -> Store:
        store.close()
        return self.open()

    def segment_files(self) -> list[Path]:
        """Every file in the segments folder (temp files too), by name: seq order."""
        return sorted(self.segments.iterdir())

    def image_files(self) -> set[str]:
        folder = self.artifacts / IMAGES_DIR
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Folder]:
    """A fresh artifacts folder."""
    made = Folder(tmp_path / "artifacts")
    yield made
    for store in made.opened:
        store.close()


class Oracle:
    """What the store must hold: id -> (image code, text code) in insertion order."""

    def __init__(self) -> None:
        self.rows: dict[ItemId, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, batch: NewItems, *, replace: bool = False) -> None:
        for i, given in enumerate(batch.ids):
            item_id = parse_id(given)
            assert replace or item_id not in self.rows
            self.rows.pop(item_id, None)  # a replaced item counts as inserted now
            self.rows[item_id] = (batch.image_codes[i], batch.text_codes[i])

    def delete(self, ids: Sequence[ItemId]) -> set[ItemId]:
        present = {parse_id(i) for i in ids} & set(self.rows)
        for item_id in present:
            del self.rows[item_id]
        return present

    def search(self, target: Target, queries: np.ndarray, k: int) -> list[list[tuple[ItemId, int]]]:
        """Brute force: popcount over every live code, sorted by (distance, insertion order)."""
        ids = list(self.rows)
        if not ids:
            return [[] for _ in queries]
        column = 0 if target == "image" else 1
        codes = np.stack([self.rows[i][column] for i in ids])  # (n, words)
        dists = np.bitwise_count(queries[:, None, :] ^ codes[None]).sum(axis=2)  # (m, n)
        order = np.arange(len(ids))
        return [[(ids[j], int(row[j])) for j in np.lexsort((order, row))[:k]] for row in dists]


def found(store: Store, target: Target, queries: np.ndarray, k: int) -> list[list[Any]]:
    """The store's answer as (id, distance) lists."""
    return as_lists(store.search(target, queries, k))


def as_lists(hits: Hits) -> list[list[Any]]:
    """A search's answer as (id, distance) lists."""
    return [[(item.id, d) for item, d in row] for row in hits.hits]


def check(store: Store, oracle: Oracle) -> None:
    """Both targets at several k (one past the count) equal the oracle, ids, types and ties,
    through search_now (first: in a shared store it catches up itself) and search alike."""
    for target in TARGETS:
        for k in (1, 7, 33, len(oracle) + 5):
            want = oracle.search(target, QUERIES[target], k)
            now = store.search_now(target, QUERIES[target], k)
            assert now is not None, "no writer holds the lock: nothing to wait for"
            assert as_lists(now) == want, (target, k)
            assert found(store, target, QUERIES[target], k) == want, (target, k)
    assert len(store) == len(oracle)


def make(
    ids: Sequence[ItemId],
    rng: np.random.Generator,
    *,
    tag: str = "",
    fields: Sequence[dict[str, Any]] | None = None,
    image_data: Sequence[tuple[bytes, str] | None] | None = None,
) -> NewItems:
    """A batch with pooled codes, captions naming id and tag, demo image paths."""
    return NewItems(
        ids=list(ids),
        texts=[f"caption of {i!r} {tag}" for i in ids],
        images=[f"demo/{i}.jpg" for i in ids],
        image_codes=IMAGE_POOL[rng.integers(0, POOL, len(ids))],
        text_codes=TEXT_POOL[rng.integers(0, POOL, len(ids))],
        fields=fields,
        image_data=image_data,
    )


def parts(store: Store) -> list[tuple[str, int]]:
    """(kind, rows) of each part of the current view."""
    return [
        ("growing" if p.name == "growing" else "segment", len(p.image)) for p in store.view().parts
    ]


def recorded(store: Store) -> set[str]:
    """The segment files the current view is made of."""
    return {p.name for p in store.view().parts if p.name != "growing"}


def tombstones(folder: Folder) -> int:
    with closing(sqlite3.connect(folder.database)) as conn:
        return int(conn.execute("SELECT count(*) FROM tombstones").fetchone()[0])


def edit(folder: Folder, sql: str) -> None:
    """Change the database by hand, as a user with the sqlite3 shell would."""
    with closing(sqlite3.connect(folder.database)) as conn, conn:
        assert conn.execute(sql).rowcount == 1


def add(store: Store, oracle: Oracle, batch: NewItems, *, replace: bool = False) -> None:
    store.add(batch, on_conflict="replace" if replace else "error")
    oracle.add(batch, replace=replace)


def built(folder: Folder) -> Oracle:
    """A closed store of ids 0..149 (seq = id): two sealed segments of 64 and 22 growing rows."""
    store, oracle, rng = folder.create(), Oracle(), np.random.default_rng(3)
    for start in range(0, 150, 10):
        add(store, oracle, make(range(start, start + 10), rng))
    assert parts(store) == [("segment", 64), ("segment", 64), ("growing", 22)]
    store.close()
    return oracle


def test_lowered_constants_reach_the_code_that_reads_them(folder: Folder) -> None:
    store, oracle, rng = folder.create(), Oracle(), np.random.default_rng(1)
    for start in range(0, 70, 10):
        add(store, oracle, make(range(start, start + 10), rng))
    assert parts(store) == [("segment", SEAL), ("growing", 70 - SEAL)]  # sealed at SEAL rows
    add(store, oracle, make(range(100, 100 + BULK), rng))  # the growing part is sealed first
    assert parts(store) == [("segment", SEAL), ("segment", 70 - SEAL), ("segment", BULK)]
    assert {p.name for p in folder.segment_files()} == recorded(store)
    assert compaction.level(SEAL * FACTOR - 1, CONFIG) == 0
    assert compaction.level(SEAL * FACTOR, CONFIG) == 1
    assert not compact_once(store)  # three level-0 segments: fewer than FACTOR
    add(store, oracle, make(range(200, 200 + BULK), rng))
    assert compact_once(store)  # FACTOR of them
    assert parts(store) == [("segment", 70 + 2 * BULK)]
    check(store, oracle)


def fresh_id(n: int) -> ItemId:
    """Integers, file names and digit strings with a leading zero (which stay strings)."""
    return (n, f"IMG_{n}.jpg", f"0{n}")[n % 3]


def given_form(item_id: ItemId, rng: np.random.Generator) -> ItemId:
    """The id as a user may give it: an integer id sometimes as its decimal string."""
    return str(item_id) if isinstance(item_id, int) and rng.random() < 0.5 else item_id


def test_search_equals_brute_force_through_every_kind_of_write(folder: Folder) -> None:
    store, oracle = folder.create(), Oracle()
    rng = np.random.default_rng(11)
    next_id = 0
    seen_segments: set[str] = set()
    counts = dict.fromkeys(("bulk", "replace", "policy", "force", "reopen", "delete"), 0)

    def new_ids(n: int) -> list[ItemId]:
        nonlocal next_id
        next_id += n
        return [given_form(fresh_id(i), rng) for i in range(next_id - n, next_id)]

    def some_live(n: int) -> list[ItemId]:
        live = list(oracle.rows)
        picked = rng.choice(len(live), size=min(n, len(live)), replace=False)
        return [given_form(live[int(j)], rng) for j in picked]

    for step in range(150):
        roll = rng.random()
        if roll < 0.3 or len(oracle) < 20:
            add(store, oracle, make(new_ids(int(rng.integers(1, 13))), rng, tag=f"s{step}"))
        elif roll < 0.4:
            counts["bulk"] += 1
            add(store, oracle, make(new_ids(int(rng.integers(BULK, BULK + 25))), rng))
        elif roll < 0.6:
            counts["delete"] += 1
            wanted = some_live(int(rng.integers(1, 16))) + [f"absent-{step}"]
            expected = oracle.delete(wanted)
            assert set(store.delete(wanted).ids) == expected
        elif roll < 0.65:
            counts["delete"] += 1
            wanted = some_live(len(oracle) // 3)  # enough to pass a segment's dead fraction
            assert set(store.delete(wanted).ids) == oracle.delete(wanted)
        elif roll < 0.8:
            counts["replace"] += 1
            size = BULK if rng.random() < 0.25 else int(rng.integers(1, 10))
            ids = some_live(size - size // 3) + new_ids(size // 3)
            add(store, oracle, make(ids, rng, tag=f"r{step}"), replace=True)
        elif roll < 0.88:
            while compact_once(store):
                counts["policy"] += 1
        elif roll < 0.93:
            counts["force"] += compact_once(store, force=True)
        else:
            counts["reopen"] += 1
            store = folder.reopen(store)
        seen_segments |= recorded(store)
        check(store, oracle)
    assert len(seen_segments) >= 30, seen_segments
    assert min(counts.values()) >= 3, counts
    store = folder.reopen(store)
    check(store, oracle)
    assert compact_once(store, force=True)
    assert len(recorded(store)) == 1
    check(store, oracle)


def test_k_past_the_count_gives_fewer_hits_and_views_pad_like_faiss(folder: Folder) -> None:
    store, oracle, rng = folder.create(), Oracle(), np.random.default_rng(2)
    queries = QUERIES["image"][:2]
    assert found(store, "image", queries, 5) == [[], []]
    add(store, oracle, make([1, 2, 3], rng))
    assert [len(row) for row in found(store, "image", queries, 10)] == [3, 3]
    check(store, oracle)
    dists, seqs = store.view().search("image", queries, 5)
    assert (dists[:, 3:] == PAD_DIST).all() and (seqs[:, 3:] == -1).all()
    assert sorted(seqs[0, :3].tolist()) == [0, 1, 2]
    store.delete([1, 2, 3])
    assert found(store, "text", queries, 4) == [[], []]


@pytest.mark.parametrize("filled", [False, True])
def test_searches_refuse_a_bad_k_or_queries_even_on_an_empty_store(
    folder: Folder, filled: bool
) -> None:
    store = folder.create()
    if filled:
        store.add(make([1, 2], np.random.default_rng(0)))
    good = QUERIES["image"][:1]
    with pytest.raises(InputError, match="expected k as an int >= 1, got 0"):
        store.search("image", good, 0)
    with pytest.raises(InputError, match="expected queries of dtype uint64"):
        store.search("image", good.astype(np.int64), 3)
    with pytest.raises(InputError, match=r"expected queries of shape \(n, 2\)"):
        store.search("image", good[:, :1].copy(), 3)


def test_5_and_string_5_are_one_id_and_007_is_a_string(folder: Folder) -> None:
    store, oracle, rng = folder.create(), Oracle(), np.random.default_rng(4)
    add(store, oracle, make([5, "007", "abc"], rng))
    five = store.get(5)
    assert five is not None and type(five.id) is int
    assert store.get("5") == five
    assert store.get(7) is None
    stored = store.get("007")
    assert stored is not None and stored.id == "007"
    assert store.existing([5, "5", "007", 7, "abc", "zzz"]) == {5, "007", "abc"}
    with pytest.raises(InputError, match=r"expected new ids, got \['5'\] already indexed"):
        store.add(make(["5"], rng))
    add(store, oracle, make(["7"], rng))  # the integer 7, beside the string "007"
    seven = store.get(7)
    assert seven is not None and type(seven.id) is int and len(store) == 4
    check(store, oracle)
    assert {type(i) for row in found(store, "image", QUERIES["image"], 4) for i, _ in row} == {
        int,
        str,
    }
    assert store.delete(["5"]).ids == [5]
    oracle.delete([5])
    assert store.get(5) is None
    check(store, oracle)


def snapshot(store: Store, oracle: Oracle, folder: Folder) -> Any:
    """Everything a refused write must leave as it was."""
    ranking = {t: found(store, t, QUERIES[t], len(oracle) + 1) for t in TARGETS}
    items = [store.get(i) for i in oracle.rows]
    return len(store), store.view().commit, ranking, items, folder.image_files()


@pytest.mark.parametrize(
    ("ids", "replace_", "message"),
    [
        ([1000, 1001, 1000], False, "expected unique ids, got id 1000 twice in this batch"),
        ([1000, "1000"], False, "expected unique ids, got id 1000 twice in this batch"),
        ([1000, 3], False, r"expected new ids, got \['3'\] already indexed"),
        ([1000, "3"], False, r"expected new ids, got \['3'\] already indexed"),
        ([3, 4, "3"], True, "expected unique ids, got id 3 twice in this batch"),
        ([*range(1000, 1000 + BULK), 1005], False, "got id 1005 twice in this batch"),
        ([*range(1000, 1000 + BULK), 140], False, r"got \['140'\] already indexed"),
        ([*range(1000, 1000 + BULK), 7, 7], True, "got id 7 twice in this batch"),
    ],
)
def test_a_batch_with_a_repeated_or_stored_id_is_refused_whole(
    folder: Folder, ids: list[ItemId], replace_: bool, message: str
) -> None:
    oracle = built(folder)
    store, rng = folder.open(), np.random.default_rng(5)
    add(store, oracle, make(range(200, 200 + BULK), rng))  # growing sealed: a bulk seals nothing
    before = snapshot(store, oracle, folder)
    image_data = [(b"bytes of a refused image", "png")] + [None] * (len(ids) - 1)
    with pytest.raises(InputError, match=message):
        store.add(
            make(ids, rng, image_data=image_data), on_conflict="replace" if replace_ else "error"
        )
    assert snapshot(store, oracle, folder) == before
    assert {p.name for p in folder.segment_files()} == recorded(store)  # no segment left over
    unique = list(dict.fromkeys(parse_id(i) for i in ids))
    retry = [i for i in unique if i not in oracle.rows] if not replace_ else unique
    add(store, oracle, make(retry, rng), replace=replace_)
    check(store, oracle)
    check(folder.reopen(store), oracle)


FIELDS: list[dict[str, Any]] = [
    {
        "title": "Ünïcødé ✓ 中文",
        "n": 3,
        "x": 1.5,
        "big": 2**62,
        "tags": ["a", "b"],
        "nested": {"none": None, "yes": True},
    },
    {},
    {"empty": "", "quote": 'say "hi"\n'},
]


def test_fields_texts_and_images_round_trip(folder: Folder) -> None:
    store = folder.create()
    batch = NewItems(
        ids=[1, "two", "003"],
        texts=["a caption", "第二个 caption", "line\nbreak ✓"],
        images=["demo/1.jpg", "demo/sub dir/2.png", "elsewhere/3.gif"],
        image_codes=IMAGE_POOL[:3].copy(),
        text_codes=TEXT_POOL[:3].copy(),
        fields=FIELDS,
    )
    before = time.time()
    store.add(batch)
    after = time.time()
    items = [store.get(i) for i in batch.ids]
    for item, item_id, text, image, fields in zip(
        items, batch.ids, batch.texts, batch.images, FIELDS, strict=True
    ):
        assert item is not None
        assert (item.id, item.text, item.image, item.fields) == (item_id, text, image, fields)
        assert before <= item.added <= after
    hit_items = {item.id: item for item, _ in store.search("text", TEXT_POOL[:1], 3).hits[0]}
    assert [hit_items[i] for i in batch.ids] == items
    store = folder.reopen(store)
    assert [store.get(i) for i in batch.ids] == items


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fields": [{"x": float("nan")}]}, "expected the item's fields as JSON"),
        ({"fields": [{"x": {1, 2}}]}, "expected the item's fields as JSON"),
        ({"fields": [["a", "list"]]}, "expected the item's fields as an object"),
        ({"fields": [{1: "a"}]}, "expected the item's fields as an object"),
        ({"fields": [{"x": "y" * 20_000}]}, "at most 16384 bytes"),
        ({"fields": [{"x": "lone \udc80"}]}, "expected the item's fields as JSON"),
        ({"texts": ["lone \ud800"]}, "expected texts of valid Unicode"),
        ({"texts": [None]}, "expected texts as strings"),
        ({"images": ["lone \ud800.jpg"]}, "expected images of valid Unicode"),
        ({"ids": ["id \ud800"]}, "expected a string id of valid Unicode"),
        ({"ids": [-1]}, "expected an integer id in"),
        ({"ids": [".."]}, "expected a string id other than '.' and '..'"),
        ({"ids": ["."]}, "expected a string id other than '.' and '..'"),
        ({"fields": [json.loads('{"a": ' * 33 + "1" + "}" * 33)]}, "nested at most 32 levels"),
    ],
)
def test_bad_item_values_are_input_errors_and_change_nothing(
    folder: Folder, change: dict[str, Any], message: str
) -> None:
    store, oracle, rng = folder.create(), Oracle(), np.random.default_rng(8)
    add(store, oracle, make([1, 2], rng))
    before = snapshot(store, oracle, folder)
    with pytest.raises(InputError, match=message):
        store.add(replace(make([3], rng), **change))
    assert snapshot(store, oracle, folder) == before
    add(store, oracle, make([3], rng))
    check(store, oracle)


def test_get_and_existing_follow_adds_replaces_and_deletes(folder: Folder) -> None:
    oracle = built(folder)
    store, rng = folder.open(), np.random.default_rng(9)
    assert store.existing([]) == set()
    assert store.existing([0, 100, 149, 150, "0", "x"]) == {0, 100, 149}  # segment and growing
    first = store.get(0)
    assert first is not None and first.text == "caption of 0 "
    assert store.get(150) is None
    add(store, oracle, make([0, 149], rng, tag="new"), replace=True)
    replaced = store.get(0)
    assert replaced is not None and replaced.text == "caption of 0 new" and replaced != first
    store.delete([0, 100, 149])
    oracle.delete([0, 100, 149])
    assert store.existing([0, 100, 149, 1]) == {1}
    assert all(store.get(i) is None for i in (0, 100, 149))
    check(store, oracle)


def image_path(data: bytes, extension: str) -> str:
    return f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()}.{extension}"


def image_of(store: Store, item_id: ItemId) -> str:
    item = store.get(item_id)
    assert item is not None
    return item.image


def test_stored_images_are_content_addressed_and_removed_with_their_last_item(
    folder: Folder,
) -> None:
    store, rng = folder.create(), np.random.default_rng(10)
    shared, own, other = (b"shared bytes", "png"), (b"own bytes", "jpg"), (b"other", "png")
    outside = folder.artifacts / "demo" / "x.jpg"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"not the store's")
    batch = make(["a", "b", "c", "d"], rng, image_data=[shared, shared, own, None])
    store.add(replace(batch, images=["ignored", "ignored", "ignored", "demo/x.jpg"]))
    assert [image_of(store, i) for i in "abcd"] == [
        image_path(*shared),
        image_path(*shared),
        image_path(*own),
        "demo/x.jpg",
    ]
    assert (folder.artifacts / image_path(*shared)).read_bytes() == b"shared bytes"
    assert folder.image_files() == {Path(image_path(*x)).name for x in (shared, own)}
    store.delete(["a"])
    assert (folder.artifacts / image_path(*shared)).is_file()  # "b" still refers to it
    store.delete(["b", "d"])
    assert not (folder.artifacts / image_path(*shared)).exists()
    assert outside.read_bytes() == b"not the store's"  # not the store's to remove
    store.add(make(["c"], rng, image_data=[own]), on_conflict="replace")  # the same bytes
    assert folder.image_files() == {Path(image_path(*own)).name}
    store.add(make(["c"], rng, image_data=[other]), on_conflict="replace")
    assert folder.image_files() == {Path(image_path(*other)).name}
    store = folder.reopen(store)
    item = store.get("c")
    assert item is not None and (folder.artifacts / item.image).read_bytes() == b"other"
    store.delete(["c"])
    assert folder.image_files() == set()


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def section(path: Path, name: str) -> int:
    """The offset of a section of a segment file, read from its header."""
    fields = LAYOUT.header.unpack(path.read_bytes()[: LAYOUT.header_size])
    return int(fields[{"seqs": 5, "image": 6, "text": 7}[name]])


CORRUPTIONS = {
    "truncated": (lambda seg, _: seg.write_bytes(seg.read_bytes()[:-8]), r"expected \d+ bytes"),
    "truncated in the header": (
        lambda seg, _: seg.write_bytes(seg.read_bytes()[:50]),
        "expected a segment file starting with",
    ),
    "flipped header byte": (lambda seg, _: flip(seg, 17), "expected a header with a valid"),
    "flipped seq byte": (lambda seg, _: flip(seg, section(seg, "seqs") + 8), "seqs section"),
    "flipped image code byte": (
        lambda seg, _: flip(seg, section(seg, "image") + 9),
        "image section checksum",
    ),
    "flipped text code byte": (
        lambda seg, _: flip(seg, section(seg, "text") + 100),
        "text section checksum",
    ),
    "swapped for another segment's": (
        lambda seg, other: shutil.copyfile(other, seg),
        "was replaced",
    ),
    "missing": (lambda seg, _: seg.unlink(), "it is missing"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_segment_file_is_refused_at_open_naming_the_file(
    folder: Folder, kind: str
) -> None:
    oracle = built(folder)
    first, second = folder.segment_files()
    original = first.read_bytes()
    corrupt, message = CORRUPTIONS[kind]
    corrupt(first, second)
    with pytest.raises(InputError, match=message) as refusal:
        Store.open(folder.artifacts, expected=MANIFEST, config=CONFIG)
    assert str(first) in str(refusal.value)
    first.write_bytes(original)  # restored, the store opens (the refusal held nothing)
    check(folder.open(), oracle)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE items SET text = 'x' WHERE seq = 3",
        """UPDATE items SET fields = '{"a": 1}' WHERE seq = 3""",
        "UPDATE items SET image = 'demo/other.jpg' WHERE seq = 3",
        "UPDATE items SET added = added + 1 WHERE seq = 3",
        "UPDATE items SET image_code = text_code WHERE seq = 3",
    ],
)
def test_a_hand_edited_row_is_an_integrity_error_when_read(folder: Folder, sql: str) -> None:
    oracle = built(folder)  # seq 3 (id 3) sits in the first segment
    edit(folder, sql)
    store = folder.open()
    message = rf"stored item 3 \(seq 3\) failed its checksum in {folder.database}"
    with pytest.raises(IntegrityError, match=message):
        store.get(3)
    with pytest.raises(IntegrityError, match=message):  # as a search hit
        store.search("image", oracle.rows[3][0][None], len(oracle))
    assert store.get(4) is not None
    rows_without_3 = Oracle()
    rows_without_3.rows = {i: codes for i, codes in oracle.rows.items() if i != 3}
    store.delete([3])  # the way out: the damaged item is deleted (or replaced)
    check(store, rows_without_3)


def test_a_hand_edited_id_and_a_growing_row_are_refused(folder: Folder) -> None:
    built(folder)
    edit(folder, "UPDATE items SET id = 9999 WHERE seq = 5")
    store = folder.open()
    assert store.get(5) is None
    with pytest.raises(IntegrityError, match=r"stored item 9999 \(seq 5\) failed its checksum"):
        store.get(9999)
    store.close()
    edit(folder, "UPDATE items SET text = 'x' WHERE seq = 140")  # a growing row: read at open
    with pytest.raises(IntegrityError, match=r"stored item 140 \(seq 140\) failed its checksum"):
        Store.open(folder.artifacts, expected=MANIFEST, config=CONFIG)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        (  # Issue 35: made the live item 7 silently unsearchable
            "INSERT INTO tombstones VALUES (7)",
            r"expected tombstones of deleted rows only in .*, got one for the live item 7 "
            r"\(seq 7\)",
        ),
        (  # Issue 35: brought a deleted item's codes back and counted it in the stats
            "DELETE FROM tombstones WHERE seq = 9",
            r"expected the 128 live rows of the segments to have metadata rows in .*, got 127",
        ),
    ],
)
def test_hand_edited_tombstones_are_refused_at_open(folder: Folder, sql: str, message: str) -> None:
    built(folder)
    store = folder.open()
    store.delete([9])  # seq 9 sits in the first segment: it has a tombstone
    store.close()
    edit(folder, sql)
    with pytest.raises(IntegrityError, match=message):
        Store.open(folder.artifacts, expected=MANIFEST, config=CONFIG)


def test_orphan_segment_and_temp_files_are_removed_at_open(folder: Folder) -> None:
    oracle = built(folder)
    kept = {p.name for p in folder.segment_files()}
    shutil.copyfile(folder.segment_files()[0], folder.segments / "seg-0000000000009999-0.seg")
    (folder.segments / ".seg-0000000000000150-1.seg.x1y2.tmp").write_bytes(b"half a segment")
    store = folder.open()
    assert {p.name for p in folder.segment_files()} == kept == recorded(store)
    check(store, oracle)


OTHER_MODEL = {
    "n_bits": 64,
    "image_backbone": "another-backbone",
    "vocabulary_sha256": "2" * 64,
    "checkpoint_sha256": "3" * 64,
}


@pytest.mark.parametrize("field", CHECKED_FIELDS)
def test_open_refuses_codes_made_by_another_model(folder: Folder, field: str) -> None:
    oracle = built(folder)
    other = OTHER_MODEL[field]
    with pytest.raises(InputError) as refusal:
        Store.open(folder.artifacts, expected=replace(MANIFEST, **{field: other}), config=CONFIG)
    assert str(refusal.value) == (
        f"the index does not match the checkpoint: {field} is {getattr(MANIFEST, field)!r} "
        f"in the index, {other!r} in the checkpoint; rebuild the index"
    )
    store = folder.open(expected=replace(MANIFEST, created=1234.5))  # same model, made later
    check(store, oracle)


def test_a_create_that_fails_part_way_leaves_no_store(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_meta = md.set_meta

    def failing(conn: sqlite3.Connection, key: str, value: str) -> None:
        if key == "store_id":
            raise OSError("no space left on device")
        set_meta(conn, key, value)

    monkeypatch.setattr(md, "set_meta", failing)
    with pytest.raises(OSError, match="no space left"):
        Store.create(folder.artifacts, MANIFEST, config=CONFIG)
    monkeypatch.setattr(md, "set_meta", set_meta)
    assert not Store.exists(folder.artifacts)
    store, oracle = folder.create(), Oracle()
    add(store, oracle, make([1, 2], np.random.default_rng(0)))
    check(folder.reopen(store), oracle)


def test_a_batch_that_fills_the_growing_part_is_published_whole(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, oracle, rng = folder.create(), Oracle(), np.random.default_rng(12)
    for start in range(0, 60, 20):
        add(store, oracle, make(range(start, start + 20), rng))
    published: list[int] = []  # the count of every view published
    publish = Store._publish

    def recording(self: Store) -> None:
        publish(self)
        published.append(self.view().count)

    monkeypatch.setattr(Store, "_publish", recording)
    add(store, oracle, make(range(60, 70), rng))  # 4 rows fill the part, it seals, 6 follow
    assert parts(store) == [("segment", SEAL), ("growing", 6)]
    assert published and set(published) == {70}  # never 64: no search saw part of the batch
    published.clear()
    add(store, oracle, make([*range(70, 120), 3, 65], rng), replace=True)  # a bulk replace
    assert published and set(published) <= {70, len(oracle)}  # the growing part is sealed first
    check(store, oracle)


def test_a_segment_past_the_dead_fraction_is_rewritten_without_its_deleted_rows(
    folder: Folder,
) -> None:
    oracle = built(folder)
    store = folder.open()
    store.delete(list(range(12)))  # 12 / 64 = 0.19 of the first segment: below the fraction
    oracle.delete(list(range(12)))
    assert not compact_once(store)
    assert tombstones(folder) == 12
    store.delete([12, 13])  # 14 / 64 = 0.22
    oracle.delete([12, 13])
    assert compact_once(store)
    assert parts(store) == [("segment", 50), ("segment", 64), ("growing", 22)]
    assert tombstones(folder) == 0
    check(store, oracle)
    check(folder.reopen(store), oracle)


def segmented(folder: Folder, rng: np.random.Generator) -> tuple[Store, Oracle]:
    """A store of 12 sealed segments, 2 bulk ones and a growing part, a quarter deleted."""
    store, oracle = folder.create(), Oracle()
    for start in range(0, 780, 20):
        add(store, oracle, make(range(start, start + 20), rng))
    for start in (1000, 2000):
        add(store, oracle, make(range(start, start + BULK + 5), rng))
    add(store, oracle, make(range(3000, 3030), rng))
    live = list(oracle.rows)
    doomed = [live[int(j)] for j in rng.choice(len(live), len(live) // 4, replace=False)]
    store.delete(doomed)
    oracle.delete(doomed)
    return store, oracle


def test_searches_during_merges_equal_the_oracle(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, oracle = segmented(folder, np.random.default_rng(13))
    expected = {(t, k): oracle.search(t, QUERIES[t], k) for t in TARGETS for k in (5, 60)}
    done = [0]  # search rounds completed by all searchers together
    during: list[int] = []  # rounds completed while each merge was between its plan and swap
    changed = threading.Condition()
    merged = compaction._merged

    def slow_merged(merge: Merge) -> Any:
        with changed:
            start = done[0]
            assert changed.wait_for(lambda: done[0] >= start + 4, timeout=120)
            during.append(done[0] - start)
        return merged(merge)

    monkeypatch.setattr(compaction, "_merged", slow_merged)
    stop = threading.Event()
    failures: list[object] = []

    def search_until_stopped() -> None:
        try:
            while not stop.is_set():
                for (target, k), want in expected.items():
                    got = found(store, target, QUERIES[target], k)
                    if got != want:
                        failures.append((target, k, got))
                with changed:
                    done[0] += 1
                    changed.notify_all()
        except BaseException as err:  # reported by the main thread
            failures.append(err)
            raise

    searchers = [threading.Thread(target=search_until_stopped) for _ in range(2)]
    for thread in searchers:
        thread.start()
    try:
        policy = 0
        while compact_once(store):
            policy += 1
        assert compact_once(store, force=True)
    finally:
        stop.set()
        for thread in searchers:
            thread.join()
    assert failures == []
    assert policy >= 3 and len(during) == policy + 1
    assert [kind for kind, _ in parts(store)] == ["segment", "growing"]
    check(store, oracle)


@pytest.mark.parametrize("force", [True, False])
def test_deletes_made_while_a_merge_runs_stay_deleted(
    folder: Folder, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    store, oracle, rng = folder.create(), Oracle(), np.random.default_rng(14)
    for start in range(0, 4 * SEAL, 16):  # FACTOR sealed segments of level 0
        add(store, oracle, make(range(start, start + 16), rng))
    add(store, oracle, make(range(1000, 1010), rng))
    store.delete(list(range(6)))  # dead when the merge is planned: dropped by it
    oracle.delete(list(range(6)))
    planned, proceed = threading.Event(), threading.Event()
    merged = compaction._merged

    def paused(merge: Merge) -> Any:
        planned.set()
        assert proceed.wait(timeout=120)
        return merged(merge)

    monkeypatch.setattr(compaction, "_merged", paused)
    outcome: list[bool] = []
    merging = threading.Thread(target=lambda: outcome.append(compact_once(store, force=force)))
    merging.start()
    try:
        assert planned.wait(timeout=120)
        doomed = [10, 70, 130, 200, 250, "1001"]  # in each merged segment, and one growing
        assert set(store.delete(doomed).ids) == oracle.delete(doomed)
        add(store, oracle, make([20, 90, 9999], rng, tag="new"), replace=True)
        check(store, oracle)  # seen at once, while the merge still runs
    finally:
        proceed.set()
        merging.join()
    assert outcome == [True]
    assert parts(store) == [("segment", 4 * SEAL - 6), ("growing", 13)]  # 7 of them masked
    for item_id in (10, 70, 130, 200, 250, 1001):
        assert store.get(item_id) is None
    check(store, oracle)
    store = folder.reopen(store)
    check(store, oracle)
    assert compact_once(store, force=True)
    assert tombstones(folder) == 0
    assert parts(store) == [("segment", 4 * SEAL - 13), ("growing", 12)]  # reloaded: live rows
    check(store, oracle)


def test_bulk_and_small_rows_carry_the_crc_that_row_crc_gives(folder: Folder) -> None:
    """Bulk rows compute their CRC inline (the fast path); it must be row_crc's, for int and
    string ids, non-ASCII captions, user fields and stored images, or every get would fail."""
    store, rng = folder.create(), np.random.default_rng(11)
    ids: list[ItemId] = [*range(BULK // 2), *(f"名-{i}" for i in range(BULK // 2))]
    fields = [{"tag": "ü", "n": i} for i in range(BULK)]
    images: list[tuple[bytes, str] | None] = [(b"img-%d" % (i % 3), "png") for i in range(BULK)]
    bulk = make(ids, rng, tag="— ünïcode", fields=fields, image_data=images)
    small = make(["x", 10_000], rng, tag="naïve", fields=[{"a": 1}, {}])
    store.add(bulk)  # BULK rows: a segment of its own, code columns NULL
    store.add(small)  # rows with their codes
    with closing(sqlite3.connect(folder.database)) as conn:
        rows = conn.execute(f"SELECT {md.ROW_COLUMNS} FROM items ORDER BY seq").fetchall()
    assert len(rows) == BULK + 2
    assert [r[6] is None for r in rows] == [True] * BULK + [False, False]
    for seq, item_id, text, image, added, fields_json, image_code, text_code, crc in rows:
        codes = (image_code or b"") + (text_code or b"")
        assert md.row_crc(seq, item_id, text, image, repr(added), fields_json, codes) == crc
    assert store.get("名-3") is not None and store.get(10_000) is not None


def test_stores_shared_by_processes_see_each_others_writes(folder: Folder) -> None:
    """Two shared opens of one folder (as two server workers): each sees the other's adds,
    replaces, deletes, seals, bulk segments and merges at its next search, and writes from
    both interleave into one store; an exclusive open is refused meanwhile, and vice versa."""
    first = Store.create(folder.artifacts, MANIFEST, shared=True, config=CONFIG)
    folder.opened.append(first)
    second = Store.open(folder.artifacts, expected=MANIFEST, shared=True, config=CONFIG)
    folder.opened.append(second)
    assert first.compacts and not second.compacts  # the first to open merges
    with pytest.raises(InputError, match="another process has it open"):
        Store.open(folder.artifacts, expected=MANIFEST, config=CONFIG)
    oracle, rng = Oracle(), np.random.default_rng(21)
    writers = [first, second]
    next_id = 0
    for step in range(40):
        writer = writers[step % 2]
        if step % 5 == 4 and len(oracle) > 20:
            victims = list(oracle.rows)[step : step + 7]
            writer.delete(victims)
            oracle.delete(victims)
        else:
            size = BULK + 3 if step in (7, 22) else int(rng.integers(1, 30))
            ids: list[ItemId] = list(range(next_id, next_id + size))
            next_id += size
            replaced = list(oracle.rows)[:2] if step % 6 == 3 else []
            add(writer, oracle, make(ids + replaced, rng, tag=str(step)), replace=bool(replaced))
        if step % 4 == 3:  # writes in between: each writer catches up inside its write
            for reader in writers:
                check(reader, oracle)
    assert any(p.name != "growing" for p in second.view().parts)  # seals and bulk segments
    assert compact_once(first, force=True) and not compact_once(second, force=True)
    assert len(first.view().parts) <= 2
    for reader in writers:
        check(reader, oracle)
    assert [p.name for p in second.view().parts] == [p.name for p in first.view().parts]
    first.close()
    second.close()
    alone = folder.open()  # exclusive, now that no shared open holds the store
    check(alone, oracle)
    with pytest.raises(InputError, match="another process has it open"):
        Store.open(folder.artifacts, expected=MANIFEST, shared=True, config=CONFIG)


@contextmanager
def writer_lock_held(store: Store) -> Iterator[None]:
    """This process's writer lock held by another thread (as during a write) for the block."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store._lock:
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    try:
        yield
    finally:
        release.set()
        thread.join()


def test_search_now_declines_rather_than_wait_for_the_writer_lock(folder: Folder) -> None:
    """search_now never waits: a shared store behind another process's commit while its own
    writer holds the lock answers None (and stays behind, not forgetting it), then catches up
    once the lock is free; an exclusive store needs no lock to answer at all."""
    first = Store.create(folder.artifacts, MANIFEST, shared=True, config=CONFIG)
    folder.opened.append(first)
    second = Store.open(folder.artifacts, expected=MANIFEST, shared=True, config=CONFIG)
    folder.opened.append(second)
    oracle, rng = Oracle(), np.random.default_rng(5)
    add(first, oracle, make(list(range(20)), rng))
    check(second, oracle)
    add(first, oracle, make(list(range(20, 40)), rng))  # second is now one commit behind
    with writer_lock_held(second):
        assert second.search_now("image", QUERIES["image"], 5) is None
        assert second.search_now("image", QUERIES["image"], 5) is None
    check(second, oracle)
    first.close()
    second.close()
    alone = folder.open()
    with writer_lock_held(alone):
        now = alone.search_now("text", QUERIES["text"], 7)
    assert now is not None and as_lists(now) == oracle.search("text", QUERIES["text"], 7)


def test_search_now_declines_a_scan_past_its_size_bound(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past config.inline_max_words of codes search_now declines (the caller's thread would be held
    for milliseconds), and search still answers; the bound counts every part's rows."""
    store, oracle = folder.create(), Oracle()
    add(store, oracle, make(list(range(40)), np.random.default_rng(8)))
    words = store.view().scan_words("image")
    assert words == 40 * n_words(N_BITS)  # 72-bit codes: two words each
    store.config = dataclasses.replace(CONFIG, inline_max_words=words + 1)
    assert store.search_now("image", QUERIES["image"], 3) is not None
    store.config = dataclasses.replace(CONFIG, inline_max_words=words)
    assert store.search_now("image", QUERIES["image"], 3) is None
    assert found(store, "image", QUERIES["image"], 3) == oracle.search("image", QUERIES["image"], 3)


def test_a_segment_merged_away_while_another_process_reads_it_is_read_again(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other process's merge removes a segment file between this store's snapshot of the
    segment list and its read of the file: the open reads a new snapshot, not an error."""
    first = Store.create(folder.artifacts, MANIFEST, shared=True, config=CONFIG)
    folder.opened.append(first)
    oracle, rng = Oracle(), np.random.default_rng(9)
    for start in range(0, 3 * SEAL, 10):
        add(first, oracle, make(range(start, start + 10), rng))
    assert len(recorded(first)) >= 2
    real_read = store_module.read_segment
    merges: list[bool] = []

    def read_after_a_merge(path: Path, **kwargs: Any) -> Any:
        if not merges:  # the first read: the other process merges just before it
            merges.append(False)  # (the merge's own reads pass straight through)
            merges[0] = compact_once(first, force=True)
        return real_read(path, **kwargs)

    monkeypatch.setattr(store_module, "read_segment", read_after_a_merge)
    second = Store.open(folder.artifacts, expected=MANIFEST, shared=True, config=CONFIG)
    folder.opened.append(second)
    assert merges == [True]
    check(second, oracle)
    assert recorded(second) == recorded(first)


def test_a_store_that_crashed_before_sealing_reopens_with_more_growing_rows(
    folder: Folder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows committed but not yet sealed when the process died: the growing part reloads
    past seal_rows, searches stay exact, and the next write seals them first."""
    store, oracle, rng = folder.create(), Oracle(), np.random.default_rng(4)
    for start in range(0, SEAL - 10, 18):  # batches below BULK: all in the growing part
        add(store, oracle, make(range(start, min(start + 18, SEAL - 10)), rng))

    def crash(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt("killed before the seal")

    original = Store._seal
    monkeypatch.setattr(store_module.Store, "_seal", crash)
    batch = make(range(SEAL - 10, SEAL + 20), rng)
    with pytest.raises(KeyboardInterrupt):
        store.add(batch)  # committed, then "killed" where the growing part would be sealed
    oracle.add(batch)
    monkeypatch.setattr(store_module.Store, "_seal", original)
    store.close()
    reopened = folder.open()
    assert parts(reopened) == [("growing", SEAL + 20)]
    check(reopened, oracle)
    add(reopened, oracle, make([10_000], rng))
    assert parts(reopened) == [("segment", SEAL + 20), ("growing", 1)]
    check(reopened, oracle)


def test_close_closes_every_threads_reader_connection(folder: Folder) -> None:
    store, rng = folder.create(), np.random.default_rng(8)
    store.add(make(range(5), rng))
    threads = [threading.Thread(target=store.get, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    readers = list(store._reader_conns)
    assert len(readers) == 3
    store.close()
    for conn in readers:
        with pytest.raises(sqlite3.ProgrammingError):  # closed: the database file is free
            conn.execute("SELECT 1")


def test_a_damaged_database_is_refused_naming_the_file(folder: Folder) -> None:
    """Pages of items.sqlite overwritten (a bad disk, a hand edit): one error naming the file,
    never sqlite3's own exception (which the CLI would print as a traceback)."""
    store, rng = folder.create(), np.random.default_rng(2)
    for start in range(0, 2000, 20):
        store.add(make(range(start, start + 20), rng))
    store.close()
    with closing(sqlite3.connect(folder.database)) as conn:
        (page,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'segments'"
        ).fetchone()
    data = bytearray(folder.database.read_bytes())
    data[(page - 1) * 4096 : page * 4096] = b"\xa5" * 4096  # schema and meta stay readable
    folder.database.write_bytes(bytes(data))
    with pytest.raises((IntegrityError, InputError), match="items.sqlite"):
        folder.open()
