"""Filtered search: every filter kind equals brute force over the matching subset (exact ids,
distances, tie order, padding) through growing rows, seals, bulk segments, deletes, replaces,
compaction and reopening, on both of the filter's scan paths (a masked part, a gathered one);
what a filter value means; bad filters; the terms table's upgrade, upkeep and integrity; and the
HTTP API (TestClient over the demo artifacts, whose builds and searches are the real ones).

The oracle states the documented semantics on its own (`passes`), not through Filter.matches.

Over 400 lines because these are filtered search's tests at every layer (its semantics, the
store's two scan paths, the terms table, HTTP), the store-level ones sharing one oracle, one
list of filters and one store config.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from common.errors import InputError, IntegrityError
from indexes.codes import pack_codes
from service.app import create_app
from service.settings import Settings
from store import filters
from store.compaction import compact_once
from store.config import StoreConfig
from store.filters import Filter, FilterIndex
from store.ids import ItemId, parse_id
from store.rows import NewItems
from store.store import DB_NAME, STORE_DIR, Store
from store.view import Target
from tests.helpers import store_manifest

N_BITS = 72  # two words per code, the second with padding bits
POOL = 24  # distinct codes per modality: ties everywhere
SEAL, BULK, FACTOR = 64, 40, 4  # lowered seal_rows, bulk_rows, merge_factor
MANIFEST = store_manifest(N_BITS)
_bits = np.random.default_rng(11).integers(0, 2, (2, POOL + 2, N_BITS))
POOLS = {"image": pack_codes(_bits[0, :POOL]), "text": pack_codes(_bits[1, :POOL])}
QUERIES = {  # per target: two pooled codes (distance-0 ties) and two from outside the pool
    "image": np.concatenate([POOLS["image"][:2], pack_codes(_bits[0, POOL:])]),
    "text": np.concatenate([POOLS["text"][:2], pack_codes(_bits[1, POOL:])]),
}
TAGS = ("news", "sport", "2024")
# Every kind of filter (and ANDs of them), as (equals, in, ids).
SPECS: list[tuple[dict[str, Any], dict[str, list[Any]], list[Any] | None]] = [
    ({"source": "cam-1"}, {}, None),
    ({"tags": "news"}, {}, None),  # a list value contains it
    ({}, {"source": ["cam-0", "cam-2", "cam-9"]}, None),
    ({}, {"tags": ["sport", "2024"]}, None),
    ({}, {}, [3, 4, "IMG_7.jpg", 10, "07", 998, "absent"]),
    ({"tags": "news", "n": 2}, {"source": ["cam-0", "cam-1"]}, None),
    ({"n": 2.0}, {}, None),  # the number 2
    ({"flag": True}, {}, None),  # not the number 1
    ({"flag": 1}, {}, None),  # not true
    ({"source": "nowhere"}, {}, None),  # nothing: every row padding
    ({"tags": "news"}, {}, [2, 5, 8, 11, 14, "IMG_1.jpg", 30, 33]),
    ({"n": 3}, {"n": [3, 4]}, list(range(0, 400, 3))),
]


# Seal at 64 rows, bulk segments from 40, merges of 4: a few hundred rows, many parts.
CONFIG = StoreConfig(seal_rows=SEAL, bulk_rows=BULK, merge_factor=FACTOR)


@pytest.fixture
def artifacts(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "artifacts"


def same(value: Any, wanted: Any) -> bool:
    """JSON equality: booleans only equal booleans, numbers compare as numbers."""
    if isinstance(value, bool) or isinstance(wanted, bool):
        return isinstance(value, bool) and isinstance(wanted, bool) and value == wanted
    if isinstance(value, str) or isinstance(wanted, str):
        return isinstance(value, str) and isinstance(wanted, str) and value == wanted
    return isinstance(value, int | float) and value == wanted


def holds(fields: dict[str, Any], field: str, wanted: Any) -> bool:
    """Whether the field is the value, or a list with it as an element."""
    if field not in fields:
        return False
    value = fields[field]
    values = value if isinstance(value, list) else [value]
    return any(same(v, wanted) for v in values)


def passes(
    item_id: ItemId,
    fields: dict[str, Any],
    spec: tuple[dict[str, Any], dict[str, list[Any]], list[Any] | None],
) -> bool:
    equals, within, ids = spec
    if ids is not None and item_id not in {parse_id(i) for i in ids}:
        return False
    return all(holds(fields, f, v) for f, v in equals.items()) and all(
        any(holds(fields, f, v) for v in values) for f, values in within.items()
    )


def as_filter(spec: tuple[dict[str, Any], dict[str, list[Any]], list[Any] | None]) -> Filter:
    return Filter.of(equals=spec[0], any_of=spec[1], ids=spec[2])


class Oracle:
    """id -> (codes per target, fields) in insertion order; brute force over a subset."""

    def __init__(self) -> None:
        self.rows: dict[ItemId, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}

    def add(self, batch: NewItems) -> None:
        for i, given in enumerate(batch.ids):
            item_id = parse_id(given)
            self.rows.pop(item_id, None)  # a replace counts as inserted now
            codes = {"image": batch.image_codes[i], "text": batch.text_codes[i]}
            self.rows[item_id] = (codes, dict(batch.fields[i]) if batch.fields else {})

    def delete(self, ids: Sequence[ItemId]) -> None:
        for item_id in ids:
            self.rows.pop(parse_id(item_id), None)

    def search(
        self, target: Target, queries: np.ndarray, k: int, spec: Any
    ) -> list[list[tuple[ItemId, int]]]:
        ids = [i for i, (_, fields) in self.rows.items() if passes(i, fields, spec)]
        if not ids:
            return [[] for _ in queries]
        codes = np.stack([self.rows[i][0][target] for i in ids])
        dists = np.bitwise_count(queries[:, None, :] ^ codes[None]).sum(axis=2)  # (m, n)
        order = np.arange(len(ids))
        return [[(ids[j], int(row[j])) for j in np.lexsort((order, row))[:k]] for row in dists]


def fields_of(n: int, rng: np.random.Generator) -> dict[str, Any]:
    """Varied fields: a string, a tag list, an int or an integral float, a bool, and junk that
    no filter matches (an object, null, a list in a list); every 7th item has none."""
    if n % 7 == 6:
        return {}
    tags = [t for t in TAGS if rng.random() < 0.4]
    number: int | float = int(rng.integers(0, 5))
    return {
        "source": f"cam-{n % 3}",
        "tags": tags + ([["news"]] if n % 5 == 0 else []),
        "n": float(number) if n % 2 else number,
        "flag": bool(n % 4 == 0) if n % 3 else int(n % 4 == 0),
        "other": {"tags": "news"} if n % 2 else None,
    }


def fresh_id(n: int) -> ItemId:
    """Integers, file names and digit strings with a leading zero (which stay strings)."""
    return (n, f"IMG_{n}.jpg", f"0{n}")[n % 3] if n % 2 else n


def make(ids: Sequence[ItemId], rng: np.random.Generator) -> NewItems:
    return NewItems(
        ids=list(ids),
        texts=[f"caption of {i!r}" for i in ids],
        images=[f"demo/{i}.jpg" for i in ids],
        image_codes=POOLS["image"][rng.integers(0, POOL, len(ids))],
        text_codes=POOLS["text"][rng.integers(0, POOL, len(ids))],
        fields=[fields_of(int(rng.integers(0, 1000)), rng) for _ in ids],
    )


def check(store: Store, oracle: Oracle) -> None:
    """Every filter, both targets, several k (one past the count): the oracle, exactly."""
    for spec in SPECS:
        where = as_filter(spec)
        for target in ("image", "text"):
            for k in (1, 6, 40, len(oracle.rows) + 3):
                got = store.search(target, QUERIES[target], k, where=where).hits
                found = [[(item.id, d) for item, d in row] for row in got]
                assert found == oracle.search(target, QUERIES[target], k, spec), (spec, target, k)


def parts(store: Store) -> list[str]:
    return ["growing" if p.name == "growing" else "segment" for p in store.view().parts]


@pytest.mark.parametrize("gather_ratio", [1, StoreConfig().gather_ratio, 10**9])
def test_filtered_search_equals_brute_force_through_every_kind_of_write(
    artifacts: Path, gather_ratio: int
) -> None:
    """ratio 1: every part's passing rows are gathered; 10**9: every part is a masked scan."""
    config = dataclasses.replace(CONFIG, gather_ratio=gather_ratio)
    store, oracle, rng = (
        Store.create(artifacts, MANIFEST, config=config),
        Oracle(),
        np.random.default_rng(5),
    )
    try:
        for start in range(0, 90, 10):  # a sealed segment and growing rows
            batch = make([fresh_id(n) for n in range(start, start + 10)], rng)
            store.add(batch)
            oracle.add(batch)
        check(store, oracle)
        for start in (100, 150):  # bulk segments (the growing part sealed first)
            batch = make([fresh_id(n) for n in range(start, start + BULK + 5)], rng)
            store.add(batch)
            oracle.add(batch)
        assert parts(store).count("segment") >= 3
        check(store, oracle)  # fills the segments' selection caches
        victims = [i for j, i in enumerate(oracle.rows) if j % 4 == 1][:30]
        store.delete(victims)  # in segments (tombstones) and in the growing part
        oracle.delete(victims)
        check(store, oracle)  # cached selections, new live masks
        replaced = list(oracle.rows)[:12]  # same ids, new fields and codes, inserted now
        batch = make(replaced, np.random.default_rng(99))
        store.add(batch, on_conflict="replace")
        oracle.add(batch)
        for start in range(300, 330, 10):
            batch = make([fresh_id(n) for n in range(start, start + 10)], rng)
            store.add(batch)
            oracle.add(batch)
        assert "growing" in parts(store)
        check(store, oracle)
        before = {p.name for p in store.view().parts}
        while compact_once(store):
            pass
        compact_once(store, force=True)
        assert parts(store) in (["segment"], ["segment", "growing"])
        assert not before & {p.name for p in store.view().parts} - {"growing"}  # merged
        check(store, oracle)
        store.close()
        store = Store.open(artifacts, expected=MANIFEST, config=CONFIG)  # caches start empty
        check(store, oracle)
    finally:
        store.close()


def test_a_filter_pads_and_orders_like_an_unfiltered_view_search(artifacts: Path) -> None:
    """At the view level: (dists, seqs) arrays, padding included, of a filter that keeps every
    row are the unfiltered view's, and a filter that keeps none gives only padding."""
    store, rng = Store.create(artifacts, MANIFEST, config=CONFIG), np.random.default_rng(8)
    conn = sqlite3.connect(artifacts / STORE_DIR / DB_NAME)  # a reader of its own
    try:
        for start in (0, 100, 200):
            store.add(make(list(range(start, start + 30)), rng))
        store.delete([5, 105])
        view, index = store.view(), FilterIndex(CONFIG)
        everything = Filter.of(ids=list(range(300)))
        nothing = Filter.of(equals={"source": "nowhere"})
        for k in (1, 17, 200):
            want = view.search("image", QUERIES["image"], k)
            got = index.search(view, "image", QUERIES["image"], k, everything, conn)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
            assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
            none = index.search(view, "image", QUERIES["image"], k, nothing, conn)
            assert (none[1] == -1).all() and (none[0] == np.iinfo(np.int32).max).all()
    finally:
        conn.close()
        store.close()


def test_new_rows_reach_a_cached_posting_list_and_deleted_ones_leave(artifacts: Path) -> None:
    store, rng = Store.create(artifacts, MANIFEST, config=CONFIG), np.random.default_rng(2)
    where = Filter.of(equals={"kind": "x"})
    query = POOLS["image"][:1]

    def ids() -> list[ItemId]:
        return [item.id for item, _ in store.search("image", query, 50, where=where).hits[0]]

    try:
        batch = make(list(range(10)), rng)
        store.add(replace(batch, fields=[{"kind": "x"}] * 3 + [{}] * 7))
        assert sorted(ids(), key=str) == [0, 1, 2]
        store.add(replace(make([50], rng), fields=[{"kind": ["y", "x"]}]))
        assert 50 in ids()
        store.delete([1])
        assert 1 not in ids() and len(ids()) == 3
        store.add(replace(make([2], rng), fields=[{"kind": "y"}]), on_conflict="replace")
        assert sorted(ids(), key=str) == [0, 50]
        with closing(sqlite3.connect(artifacts / STORE_DIR / DB_NAME)) as conn:
            terms = conn.execute("SELECT term, seq FROM terms ORDER BY seq").fetchall()
        # the deleted item's and the replaced item's old terms went with their rows
        x, y = '["kind","x"]', '["kind","y"]'
        assert sorted(terms) == sorted([(x, 0), (y, 10), (x, 10), (y, 11)])
    finally:
        store.close()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"equals": {"a": None}}, r"expected the value of 'a' as a string, number or boolean"),
        ({"equals": {"a": [1]}}, r"as a string, number or boolean, got list"),
        ({"equals": {"a": float("nan")}}, r"expected the value of 'a' as a finite number"),
        ({"equals": {"": 1}}, r"expected a field name of 1..256 characters"),
        ({"equals": {"a": "x" * 1001}}, r"of at most 1000 characters"),
        ({"any_of": {"a": []}}, r"expected 1..1000 values for 'a', got 0"),
        ({"any_of": {"a": "abc"}}, r"expected a list of values for 'a'"),
        ({"any_of": {"a": list(range(1001))}}, r"expected 1..1000 values for 'a', got 1001"),
        ({"equals": {f"f{i}": 1 for i in range(17)}}, r"at most 16 field conditions, got 17"),
        ({"ids": list(range(10_001))}, r"expected at most 10000 ids in a filter, got 10001"),
        ({"ids": [-1]}, r"expected an integer id in 0\.\."),
        ({"ids": "abc"}, r"expected a list of ids, got str"),
        ({"equals": {"a": "\udc80"}}, r"expected the value of 'a' of valid Unicode"),
        ({"equals": {"\udc80": 1}}, r"expected a field name of valid Unicode"),
    ],
)
def test_bad_filters_are_input_errors(given: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message):
        Filter.of(**given)


def test_what_a_filter_value_means() -> None:
    fields = {"n": 5.0, "b": True, "s": "5", "tags": ["a", 2, ["c"]], "o": {"x": 1}, "z": None}
    assert Filter.of(equals={"n": 5}).matches(1, fields)  # 5 and 5.0 are one number
    assert not Filter.of(equals={"b": 1}).matches(1, fields)  # true is not 1
    assert not Filter.of(equals={"s": 5}).matches(1, fields)  # "5" is not 5
    assert Filter.of(equals={"tags": "a"}).matches(1, fields)  # a list contains it
    assert Filter.of(any_of={"tags": [7, 2.0]}).matches(1, fields)
    assert not Filter.of(equals={"tags": "c"}).matches(1, fields)  # not inside a nested list
    assert not Filter.of(equals={"o": 1}).matches(1, fields)  # objects never match
    assert Filter.of(ids=["5"]).matches(5, fields) and not Filter.of(ids=["05"]).matches(5, {})
    assert Filter.of().keeps_all and not Filter.of(ids=[]).keeps_all
    # one key whatever the order of clauses, values and ids
    assert (
        Filter.of(equals={"a": 1, "b": "x"}, ids=[1, "q"]).key
        == Filter.of(equals={"b": "x", "a": 1.0}, ids=["q", 1]).key
    )
    assert Filter.of(equals={"a": True}).key != Filter.of(equals={"a": 1}).key
    # the terms of a Python caller's fields are those of the JSON the store keeps
    given = {"t": ("x", 1.0), "n": 2.0, "b": False, "o": {"x": 1}, "l": [["y"], None, "z"]}
    assert filters.terms_of(given) == filters.terms_of_json(json.dumps(given))


def test_an_empty_ids_list_keeps_nothing_and_an_empty_filter_everything(artifacts: Path) -> None:
    store = Store.create(artifacts, MANIFEST, config=CONFIG)
    try:
        store.add(make(list(range(20)), np.random.default_rng(1)))
        q = QUERIES["text"]
        assert store.search("text", q, 5, where=Filter.of(ids=[])).hits == [[]] * len(q)
        assert store.search("text", q, 5, where=Filter.of()).hits == store.search("text", q, 5).hits
    finally:
        store.close()


def test_a_version_1_store_is_upgraded_at_open_with_its_items_terms(artifacts: Path) -> None:
    upgrade = dataclasses.replace(CONFIG, upgrade_rows=7)  # the upgrade reads many pieces
    store, oracle, rng = (
        Store.create(artifacts, MANIFEST, config=CONFIG),
        Oracle(),
        np.random.default_rng(4),
    )
    for start in (0, 30, 60):
        batch = make([fresh_id(n) for n in range(start, start + 30)], rng)
        store.add(batch)
        oracle.add(batch)
    store.close()
    with closing(sqlite3.connect(artifacts / STORE_DIR / DB_NAME)) as conn, conn:
        conn.execute("DROP TABLE terms")  # what a store made before filters holds
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    store = Store.open(artifacts, expected=MANIFEST, config=upgrade)
    try:
        check(store, oracle)
        with closing(sqlite3.connect(artifacts / STORE_DIR / DB_NAME)) as conn:
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            assert version.fetchone() == ("3",)
    finally:
        store.close()
    with closing(sqlite3.connect(artifacts / STORE_DIR / DB_NAME)) as conn, conn:
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    with pytest.raises(InputError, match="expected store schema version 3 in .*, got 4"):
        Store.open(artifacts, expected=MANIFEST, config=CONFIG)


# Issue 35: an item {"n": 1e20} was not found by equals n: 100000000000000000000, nor the
# reverse, and 2**63 as a float did not match 9223372036854775808, although the README says
# values compare as JSON values (Python's == agrees: 10**20 == 1e20).
BIG_NUMBERS = {1: 10**20, 2: 1e20, 3: 2.0**63, 4: 2**63, 5: 10**20 + 1, 6: -(2**70), 7: 2**1030}
BIG_QUERIES = [(10**20, {1, 2}), (1e20, {1, 2}), (2**63, {3, 4}), (2.0**63, {3, 4})]
BIG_QUERIES += [(10**20 + 1, {5}), (-(2.0**70), {6}), (2**1030, {7}), (2**63 - 1, set())]


def big_number_hits(store: Store) -> list[set[ItemId]]:
    found = []
    for value, _ in BIG_QUERIES:
        where = Filter.of(equals={"n": value})
        hits = store.search("text", pack_codes(np.ones((1, N_BITS), np.uint8)), 20, where=where)
        found.append({item.id for item, _ in hits.hits[0]})
    return found


def test_numbers_past_2_63_compare_as_json_values_and_version_2_stores_are_retermed(
    artifacts: Path,
) -> None:
    store = Store.create(artifacts, MANIFEST, config=CONFIG)
    codes = pack_codes(np.zeros((len(BIG_NUMBERS), N_BITS), np.uint8))
    store.add(
        NewItems(
            ids=list(BIG_NUMBERS),
            texts=["a big number"] * len(BIG_NUMBERS),
            images=[""] * len(BIG_NUMBERS),
            image_codes=codes,
            text_codes=codes,
            fields=[{"n": n} for n in BIG_NUMBERS.values()],
        )
    )
    expected = [wanted for _, wanted in BIG_QUERIES]
    assert big_number_hits(store) == expected
    for value, wanted in BIG_QUERIES:  # the oracle agrees
        where = Filter.of(equals={"n": value})
        assert {i for i, n in BIG_NUMBERS.items() if where.matches(i, {"n": n})} == wanted
    store.close()
    with closing(sqlite3.connect(artifacts / STORE_DIR / DB_NAME)) as conn, conn:
        for item_id in (1, 4):  # the integer terms as version 2 wrote them
            (seq,) = conn.execute("SELECT seq FROM items WHERE id = ?", (item_id,)).fetchone()
            conn.execute("DELETE FROM terms WHERE seq = ?", (seq,))
            conn.execute(
                "INSERT INTO terms VALUES (?, ?)", (filters.term("n", BIG_NUMBERS[item_id]), seq)
            )
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    store = Store.open(artifacts, expected=MANIFEST, config=CONFIG)
    try:
        assert big_number_hits(store) == expected
    finally:
        store.close()


def test_a_hand_added_term_row_is_an_integrity_error_not_a_wrong_hit(artifacts: Path) -> None:
    store = Store.create(artifacts, MANIFEST, config=CONFIG)
    batch = make(list(range(10)), np.random.default_rng(6))
    store.add(replace(batch, fields=[{"k": "a"}] * 5 + [{"k": "b"}] * 5))
    store.close()
    with closing(sqlite3.connect(artifacts / STORE_DIR / DB_NAME)) as conn, conn:
        conn.execute("""INSERT INTO terms VALUES ('["k","a"]', 7)""")
    store = Store.open(artifacts, expected=MANIFEST, config=CONFIG)
    try:
        with pytest.raises(
            IntegrityError, match=r"stored item 7 \(seq 7\) does not pass the filter"
        ):
            store.search("image", QUERIES["image"], 10, where=Filter.of(equals={"k": "a"}))
        b = store.search("image", QUERIES["image"], 10, where=Filter.of(equals={"k": "b"}))
        assert sorted(item.id for item, _ in b.hits[0]) == [5, 6, 7, 8, 9]
    finally:
        store.close()


def test_shared_stores_filter_each_others_writes(artifacts: Path) -> None:
    """Two shared opens (two server workers): one's adds, replaces and deletes reach the other's
    cached posting lists and selections at its next filtered search."""
    first = Store.create(artifacts, MANIFEST, shared=True, config=CONFIG)
    second = Store.open(artifacts, expected=MANIFEST, shared=True, config=CONFIG)
    oracle, rng = Oracle(), np.random.default_rng(13)
    try:
        for step in range(8):
            writer, reader = (first, second) if step % 2 else (second, first)
            batch = make([fresh_id(n) for n in range(step * 25, step * 25 + 25)], rng)
            writer.add(batch)
            oracle.add(batch)
            if step % 3 == 2:
                victims = list(oracle.rows)[step::5]
                writer.delete(victims)
                oracle.delete(victims)
            check(reader, oracle)
    finally:
        first.close()
        second.close()


# ---- HTTP ----------------------------------------------------------------------------------


def png(colour: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def built_client(artifacts: Path) -> TestClient:
    return TestClient(create_app(Settings(artifacts_dir=artifacts)))


def wait(client: TestClient, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if status["status"] in ("succeeded", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError("build did not finish")


HTTP_FIELDS = [
    {"source": "camera-3", "tags": ["news", "2024"]},
    {"source": "camera-1", "tags": ["sport"]},
    {"source": "camera-3", "tags": ["sport", "2024"], "n": 2},
    {"source": "camera-2"},
]


def test_http_filtered_searches_are_the_unfiltered_ranking_cut_to_the_matches(
    demo_artifacts: Path,
) -> None:
    """Through the real app: items built with fields; each filtered search (text and image
    queries) is the full unfiltered ranking restricted to the items that pass, cut at k."""
    with built_client(demo_artifacts) as client:
        colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
        items = [
            {"id": f"f-{j}", "text": f"a red car number {j}", "image_base64": png(colours[j % 4]),
             "fields": HTTP_FIELDS[j % 4]}
            for j in range(12)
        ]  # fmt: skip
        accepted = client.post("/v1/index/build", json={"items": items})
        assert accepted.status_code == 202, accepted.text
        assert wait(client, accepted.json()["job_id"])["status"] == "succeeded"
        total = client.get("/v1/index/stats").json()["items"]
        body = {"text": "a red car", "target": "text"}
        everything = client.post("/v1/search/text", json={**body, "k": min(total, 100)}).json()
        assert everything["hits"]  # the demo holds at most max_k items, plus ours
        cases: list[tuple[dict[str, Any], Any]] = [
            ({"equals": {"source": "camera-3"}}, lambda h: h["fields"].get("source") == "camera-3"),
            ({"equals": {"tags": "2024"}}, lambda h: "2024" in h["fields"].get("tags", [])),
            ({"in": {"source": ["camera-1", "camera-2"]}},
             lambda h: h["fields"].get("source") in ("camera-1", "camera-2")),
            ({"ids": ["f-0", "f-5", 3, "nope"]}, lambda h: h["id"] in ("f-0", "f-5", 3)),
            ({"equals": {"tags": "sport", "n": 2.0}, "in": {"source": ["camera-3"]}},
             lambda h: h["fields"].get("n") == 2),
        ]  # fmt: skip
        for given, keep in cases:
            for k in (1, 3, 100):
                got = client.post("/v1/search/text", json={**body, "k": k, "filter": given})
                assert got.status_code == 200, got.text
                want = [h for h in everything["hits"] if keep(h)][:k]
                assert got.json()["hits"] == want, (given, k)
        image = base64.b64decode(png((200, 30, 30)))
        ranked = client.post(
            "/v1/search/image", files={"file": ("q.png", image, "image/png")},
            data={"k": "100", "target": "image"},
        ).json()["hits"]  # fmt: skip
        got = client.post(
            "/v1/search/image", files={"file": ("q.png", image, "image/png")},
            data={"k": "4", "target": "image", "filter": '{"equals": {"source": "camera-3"}}'},
        )  # fmt: skip
        assert got.status_code == 200, got.text
        want = [h for h in ranked if h["fields"].get("source") == "camera-3"][:4]
        assert got.json()["hits"] == want and len(want) == 4


@pytest.mark.parametrize(
    ("given", "status", "message"),
    [
        ({"equals": {"a": None}}, 422, "equals"),
        ({"equals": {"a": {"b": 1}}}, 422, "equals"),
        ({"in": {"a": []}}, 422, "at least 1 item"),
        ({"in": {"a": list(range(1001))}}, 422, "at most 1000 items"),
        ({"ids": list(range(10_001))}, 422, "at most 10000 items"),
        ({"ids": [-3]}, 422, "expected an integer id"),
        ({"where": {"a": 1}}, 422, "Extra inputs are not permitted"),
        ({"equals": {f"f{i}": 1 for i in range(17)}}, 422, "at most 16 items"),
        (
            {"equals": {f"f{i}": 1 for i in range(9)}, "in": {f"g{i}": [1] for i in range(9)}},
            422,
            "expected at most 16 field conditions, got 18",
        ),
        ("source = 'x'", 422, "valid dictionary"),
    ],
)
def test_http_bad_filters_are_4xx_saying_what_was_expected(
    demo_artifacts: Path, given: Any, status: int, message: str
) -> None:
    with built_client(demo_artifacts) as client:
        got = client.post("/v1/search/text", json={"text": "a red car", "filter": given})
        assert got.status_code == status and message in got.text, got.text
        escaped = b'{"text": "a car", "filter": {"equals": {"a": "\\ud800"}}}'  # JSON may say it
        got = client.post(
            "/v1/search/text", content=escaped, headers={"content-type": "application/json"}
        )
        assert got.status_code == 422 and "of valid Unicode, got a lone surrogate" in got.text
        image = base64.b64decode(png((200, 30, 30)))
        bad_form = client.post(
            "/v1/search/image", files={"file": ("q.png", image, "image/png")},
            data={"filter": "{not json"},
        )  # fmt: skip
        assert bad_form.status_code == 400 and "expected the filter as JSON" in bad_form.text
        schema = client.get("/openapi.json").json()["components"]["schemas"]["SearchFilter"]
        assert schema["properties"]["ids"]["anyOf"][0]["maxItems"] == filters.MAX_IDS
        assert "ARRAY_CONTAINS" in schema["properties"]["equals"]["description"]
        assert f"At most {filters.MAX_CLAUSES} field conditions" in schema["description"]
