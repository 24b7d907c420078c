"""Asymmetric scoring (indexes/asymmetric.py) and the Hamming radius, against brute force: the
index (every scan path), the local store (segments, deletes, filters) and MilvusStore over a
real milvus-lite server (its candidate rounds and its full read), exact ids and tie order."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from indexes.asymmetric import WEIGHT_TOTAL, Asymmetric
from indexes.codes import pack_codes, unpack_codes
from indexes.hamming import SPLIT_MIN_WORDS, HammingIndex, LiveMask
from indexes.milvus import TOPK_LIMIT, rows_and_vectors, vector_bytes
from store import milvus_store
from store.config import StoreConfig
from store.filters import Filter
from store.milvus_lite import MilvusLite
from store.milvus_store import Candidates, MilvusStore
from store.rows import NewItems
from store.store import Hits, Store
from tests.helpers import store_manifest


def real_queries(rng: np.random.Generator, m: int, n_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(signs (m, words), q (m, n_bits)): tanh outputs, L2-normalised, some near 0 (as learned
    ones: a tenth of them below a fifth of the mean)."""
    q = np.tanh(rng.normal(0.0, 1.5, (m, n_bits)))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return pack_codes(np.where(q > 0, 1, -1)), q


def brute(
    signs: np.ndarray,
    weights: np.ndarray,
    codes: np.ndarray,
    ids: np.ndarray,
    k: int,
    *,
    radius: int | None = None,
    live: np.ndarray | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Per query: ids and weighted distances of the k best codes (sum of the weights of the
    differing bits, bit by bit; ties in insertion order) among live codes within the radius."""
    n_bits = weights.shape[1]
    bits = unpack_codes(codes, n_bits)  # (n, n_bits)
    out_ids, out_wd = [], []
    for row in range(signs.shape[0]):
        differs = bits != unpack_codes(signs[row : row + 1], n_bits)  # (n, n_bits)
        wd = (differs * weights[row]).sum(axis=1)
        keep = np.ones(len(ids), bool) if live is None else live.copy()
        if radius is not None:
            keep &= differs.sum(axis=1) <= radius
        order = [j for j in np.lexsort((np.arange(len(ids)), wd)) if keep[j]][:k]
        out_ids.append([int(ids[j]) for j in order])
        out_wd.append([int(wd[j]) for j in order])
    return out_ids, out_wd


def pooled(rng: np.random.Generator, n: int, n_bits: int, pool: int) -> np.ndarray:
    """n codes drawn from `pool` distinct ones: many exact ties."""
    return pack_codes(rng.integers(0, 2, (pool, n_bits)))[rng.integers(0, pool, n)]


@pytest.mark.parametrize("n_bits", [16, 64, 72, 128])
def test_index_ranks_by_weighted_distance_exactly(n_bits: int) -> None:
    """Every k, radius and live mask, one query (database split) and many (queries split)."""
    rng = np.random.default_rng(n_bits)
    n = 3000
    codes = pooled(rng, n, n_bits, 400)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)  # not sorted: positions are the order
    index = HammingIndex.from_arrays(n_bits, codes, ids, threads=2)
    signs, q = real_queries(rng, 70, n_bits)
    signs[3] = codes[17]  # a query at distance 0 from some codes
    asym = Asymmetric.of(signs, q)
    live = rng.random(n) < 0.7
    for k in (1, 10, 257, n + 3):
        for radius in (None, n_bits // 4):
            for mask in (None, live):
                got_wd, got_ids = index.search(
                    signs,
                    k,
                    asymmetric=asym,
                    radius=radius,
                    live=None if mask is None else LiveMask.of(mask),
                )
                want_ids, want_wd = brute(
                    signs, asym.weights, codes, ids, k, radius=radius, live=mask
                )
                for row in range(len(signs)):
                    found = int((got_ids[row] >= 0).sum())
                    assert got_ids[row, :found].tolist() == want_ids[row], (k, radius, row)
                    assert got_wd[row, :found].tolist() == want_wd[row], (k, radius, row)
                    assert (got_ids[row, found:] == -1).all()
                one_wd, one_ids = index.search(
                    signs[5:6], k, asymmetric=asym.rows(5, 6), radius=radius
                )
                want_ids, _ = brute(signs[5:6], asym.weights[5:6], codes, ids, k, radius=radius)
                assert one_ids[0, : len(want_ids[0])].tolist() == want_ids[0]


def test_a_database_split_over_threads_gives_the_same_answer() -> None:
    """Past SPLIT_MIN_WORDS one query's scan is cut into pieces with their own heaps."""
    rng = np.random.default_rng(5)
    n = SPLIT_MIN_WORDS + 5000
    codes = pooled(rng, n, 64, 5000)
    index = HammingIndex.from_arrays(64, codes, np.arange(n, dtype=np.int64), threads=2)
    signs, q = real_queries(rng, 1, 64)
    asym = Asymmetric.of(signs, q)
    x = (codes[:, 0] ^ signs[0, 0]).astype(np.uint64)
    wd = np.zeros(n, dtype=np.int64)
    for bit in range(64):  # weight of each differing bit, one bit at a time
        wd += ((x >> np.uint64(bit)) & np.uint64(1)).astype(np.int64) * asym.weights[0, bit]
    want = np.lexsort((np.arange(n), wd))[:50]
    got_wd, got_ids = index.search(signs, 50, asymmetric=asym)
    assert got_ids[0].tolist() == want.tolist()
    assert got_wd[0].tolist() == wd[want].tolist()


def test_scores_are_the_inner_product_with_the_real_query() -> None:
    """The reported score is <q, b> / sqrt(n_bits) within the rounding of the weights, and the
    ranking is the real inner product's wherever two items' products differ by more."""
    rng = np.random.default_rng(2)
    n_bits, n = 64, 2000
    codes = pooled(rng, n, n_bits, 1500)
    signs, q = real_queries(rng, 8, n_bits)
    asym = Asymmetric.of(signs, q)
    index = HammingIndex.from_arrays(n_bits, codes, np.arange(n, dtype=np.int64))
    wd, ids = index.search(signs, n, asymmetric=asym)
    scores = asym.scores(wd)
    real = q @ unpack_codes(codes, n_bits).T.astype(np.float64) / np.sqrt(n_bits)  # (8, n)
    tolerance = np.abs(q).sum(axis=1) * np.sqrt(n_bits) / WEIGHT_TOTAL  # per query
    for row in range(len(q)):
        exact = real[row, ids[row]]
        assert np.abs(scores[row] - exact).max() <= tolerance[row]
        assert (np.diff(exact) <= 2 * tolerance[row]).all()  # best first, up to the rounding
        assert (np.diff(scores[row]) <= 0).all()


def test_weights_are_zero_where_q_has_not_the_sign_of_the_code() -> None:
    signs = pack_codes(np.array([[1, -1, 1, -1, 1, 1, 1, 1]]))
    q = np.array([[0.5, -0.5, -1e-9, 0.0, 0.5, 0.5, 0.1, 0.1]])
    weights = Asymmetric.of(signs, q).weights[0]
    assert weights[2] == 0 and weights[3] == 0
    assert weights[0] == weights[1] == weights[4] > weights[6] > 0


# ---- the stores -------------------------------------------------------------------------

N_BITS = 64
MANIFEST = store_manifest(N_BITS)
TAGS = ["news", "sport", "2024"]


def batch(rng: np.random.Generator, first: int, n: int, pool: np.ndarray) -> NewItems:
    ids: list[int | str] = [i if i % 3 else f"img-{i}" for i in range(first, first + n)]
    return NewItems(
        ids=ids,
        texts=[f"caption {i}" for i in ids],
        images=[f"pic/{i}.jpg" for i in ids],
        image_codes=pool[rng.integers(0, len(pool), n)],
        text_codes=pool[rng.integers(0, len(pool), n)],
        fields=[{"tags": [TAGS[i % 3]], "n": i % 5} for i in range(first, first + n)],
    )


class Oracle:
    """Live items in insertion order: id -> (image code, text code, fields)."""

    def __init__(self) -> None:
        self.rows: dict[object, tuple[np.ndarray, np.ndarray, dict[str, object]]] = {}

    def add(self, items: NewItems) -> None:
        for i, item_id in enumerate(items.ids):
            fields = items.fields[i] if items.fields else {}
            self.rows[item_id] = (items.image_codes[i], items.text_codes[i], fields)

    def search(
        self,
        target: str,
        asym: Asymmetric,
        k: int,
        *,
        radius: int | None,
        where: Filter | None,
    ) -> tuple[list[list[tuple[object, int]]], list[list[int]]]:
        """Per query: (id, Hamming distance) of the k best, and their weighted distances."""
        ids = [i for i, row in self.rows.items() if where is None or where.matches(i, row[2])]
        if not ids:
            return [[] for _ in asym.signs], [[] for _ in asym.signs]
        codes = np.stack([self.rows[i][0 if target == "image" else 1] for i in ids])
        found, wds = brute(asym.signs, asym.weights, codes, np.arange(len(ids)), k, radius=radius)
        bits = unpack_codes(codes, N_BITS)
        out = []
        for row, positions in enumerate(found):
            hamming = (bits != unpack_codes(asym.signs[row : row + 1], N_BITS)).sum(axis=1)
            out.append([(ids[p], int(hamming[p])) for p in positions])
        return out, wds


def answers(hits: Hits) -> list[list[tuple[object, int]]]:
    return [[(item.id, d) for item, d in row] for row in hits.hits]


WHERES = [None, Filter.of(equals={"tags": "news"}), Filter.of(any_of={"n": [1, 4]})]


def check_store(store: Store | MilvusStore, oracle: Oracle, asym: Asymmetric) -> None:
    """Asymmetric answers (and the Hamming radius) of both targets equal brute force."""
    for target in ("image", "text"):
        for where in WHERES:
            for k, radius in ((1, None), (9, None), (40, 20), (500, None)):
                got = store.search(
                    target, asym.signs, k, where=where, asymmetric=asym, radius=radius
                )
                want, want_wd = oracle.search(target, asym, k, radius=radius, where=where)
                assert answers(got) == want, (target, where, k, radius)
                for row, wd in enumerate(want_wd):
                    expected = asym.rows(row, row + 1).scores(np.array([wd]))[0].tolist()
                    assert got.scores[row] == expected
        hamming = store.search(target, asym.signs, 30, radius=18)
        plain = store.search(target, asym.signs, 30)
        within = [[(i, d) for i, d in row if d <= 18] for row in answers(plain)]
        assert answers(hamming) == within


# Seal at 50 rows, bulk segments from 40: a few hundred items make several parts.
LOWERED = StoreConfig(seal_rows=50, bulk_rows=40)


def test_local_store_asymmetric_and_radius_equal_brute_force(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    pool = pack_codes(rng.integers(0, 2, (30, N_BITS)))
    signs, q = real_queries(rng, 4, N_BITS)
    signs[0] = pool[0]  # ties at distance 0
    asym = Asymmetric.of(signs, q)
    store, oracle = Store.create(tmp_path, MANIFEST, config=LOWERED), Oracle()
    try:
        for first in range(0, 300, 45):
            items = batch(rng, first, 45, pool)
            store.add(items)
            oracle.add(items)
        assert len(store.view().parts) > 3
        gone = list(oracle.rows)[::7]
        store.delete(gone)
        for i in gone:
            del oracle.rows[i]
        check_store(store, oracle, asym)
        now = store.search_now("image", signs, 9, asymmetric=asym)
        assert now is not None and answers(now) == answers(
            store.search("image", signs, 9, asymmetric=asym)
        )
    finally:
        store.close()


def test_search_now_declines_an_asymmetric_scan_past_half_its_bound(tmp_path: Path) -> None:
    """An asymmetric scan costs about twice a Hamming one: the event loop takes half the codes."""
    rng = np.random.default_rng(13)
    pool = pack_codes(rng.integers(0, 2, (30, N_BITS)))
    signs, q = real_queries(rng, 1, N_BITS)
    asym = Asymmetric.of(signs, q)
    words = 40 * 1  # 40 items of one 64-bit word
    for bound, asymmetric_inline in ((2 * words, False), (2 * words + 2, True)):
        folder = tmp_path / str(bound)
        store = Store.create(folder, MANIFEST, config=StoreConfig(inline_max_words=bound))
        try:
            store.add(batch(rng, 0, 40, pool))
            assert store.view().scan_words("image") == words
            assert store.search_now("image", signs, 3) is not None
            now = store.search_now("image", signs, 3, asymmetric=asym)
            assert (now is not None) == asymmetric_inline
            if now is not None:
                want = store.search("image", signs, 3, asymmetric=asym)
                assert answers(now) == answers(want)
        finally:
            store.close()


@pytest.mark.parametrize(
    "candidates",
    [Candidates(), Candidates(first=8, factor=1, most=32)],
    ids=["default", "few-candidates"],
)
def test_milvus_store_asymmetric_and_radius_equal_brute_force(
    tmp_path: Path, milvus_lite: MilvusLite, candidates: Candidates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With few candidates allowed, the rounds grow and then read every code, in pages of 7
    (so that a page ends inside the top k and between the filter's items): still exact."""
    if candidates.most < TOPK_LIMIT:
        monkeypatch.setattr(milvus_store, "SCAN_BATCH", 7)
    rng = np.random.default_rng(12)
    pool = pack_codes(rng.integers(0, 2, (30, N_BITS)))
    signs, q = real_queries(rng, 3, N_BITS)
    signs[0] = pool[0]
    asym = Asymmetric.of(signs, q)
    store = MilvusStore.open(
        tmp_path,
        uri=milvus_lite.uri,
        collection=f"t_{uuid.uuid4().hex}",
        expected=MANIFEST,
        candidates=candidates,
    )
    oracle = Oracle()
    try:
        for first in range(0, 240, 60):
            items = batch(rng, first, 60, pool)
            store.add(items)
            oracle.add(items)
        gone = list(oracle.rows)[::9]
        store.delete(gone)
        for i in gone:
            del oracle.rows[i]
        check_store(store, oracle, asym)
    finally:
        store.drop()
        store.close()


def test_a_query_result_s_codes_are_read_as_one_column(
    tmp_path: Path, milvus_lite: MilvusLite
) -> None:
    """rows_and_vectors reads the pinned pymilvus's result column at once (its row-by-row
    reading copies the column once per row), and gives what reading row by row gives."""
    rng = np.random.default_rng(3)
    store = MilvusStore.open(
        tmp_path, uri=milvus_lite.uri, collection=f"t_{uuid.uuid4().hex}", expected=MANIFEST
    )
    try:
        store.add(batch(rng, 0, 50, pack_codes(rng.integers(0, 2, (50, N_BITS)))))
        fields = ["id", "seq", "image_code"]
        page = store._client.query(store.collection, filter="", output_fields=fields, limit=50)
        assert [d.field_name for d in page._lazy_field_data] == ["image_code"]  # the column
        rows, vectors = rows_and_vectors(page, "image_code", N_BITS // 8)
        assert all(row["image_code"] is None for row in rows)  # taken from the column
        again = store._client.query(store.collection, filter="", output_fields=fields, limit=50)
        plain = [dict(row) for row in again]  # row by row, as any pymilvus gives them
        assert [r["id"] for r in rows] == [r["id"] for r in plain] and len(rows) == 50
        assert vectors.tobytes() == b"".join(vector_bytes(r["image_code"]) for r in plain)
        assert rows_and_vectors(plain, "image_code", N_BITS // 8)[1].tobytes() == vectors.tobytes()
    finally:
        store.drop()
        store.close()


def test_bench_scoring_writes_the_documented_json(
    demo_artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cmh bench scoring` on the demo's checkpoint and photos, a small database."""
    out = tmp_path / "scoring.json"
    argv = [
        "bench", "scoring", "--checkpoint", str(demo_artifacts / "model.pt"),
        "--dataset", "demo", "--root", str(demo_artifacts / "demo"),
        "--cache-dir", str(demo_artifacts / "features"),
        "--n", "5000", "--queries", "6", "--runs", "2", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert (result["n"], result["queries"], result["runs"], result["k"]) == (5000, 6, 2, 10)
    assert result["dataset"] == "demo" and result["flip"] == 0.05
    for scoring in ("hamming", "asymmetric"):
        assert len(result["per_run"][scoring]) == 2 and result["p50_us"][scoring] > 0
    ratio = result["p50_us"]["asymmetric"] / result["p50_us"]["hamming"]
    assert result["ratio_p50"] == pytest.approx(ratio)
    assert main([*argv[:-2], "--flip", "0.9", "--json", str(out)]) == 2
