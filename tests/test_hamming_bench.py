"""`cmh bench index` and `cmh bench mih` on small data: the JSON they print and write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.index import make_data, recall
from cli.main import main
from indexes.hamming import HammingIndex
from store.rows import NewItems
from store.store import Store
from tests.helpers import store_manifest


def test_bench_index_writes_the_documented_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "index", "--n", "3000", "--bits", "128", "--k", "10"]
    assert main([*argv, "--queries", "20", "--threads", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert (result["n"], result["bits"], result["k"], result["queries"]) == (3000, 128, 10, 20)
    assert result["threads"] == 2 and result["recall"] == 1.0 and result["same_distances"]
    for side in ("ours", "faiss_flat"):
        assert result[side]["single_ms"] > 0 and result[side]["batch_qps"] > 0
    ratio = result["ours"]["batch_qps"] / result["faiss_flat"]["batch_qps"]
    assert result["ratio_batch"] == pytest.approx(ratio)
    assert result["limits"]["read_gbs"] > 0 and result["limits"]["popcount_gwords_s"] > 0


def test_bench_mih_on_the_codes_of_a_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = Store.create(tmp_path, store_manifest(64))
    codes = rng.integers(0, 2**63, size=(500, 1), dtype=np.int64).astype(np.uint64)
    store.add(
        NewItems(
            ids=list(range(500)), texts=["a caption"] * 500, images=["images/x.jpg"] * 500,
            image_codes=codes, text_codes=codes[::-1].copy(),
        )
    )  # fmt: skip
    store.close()
    out = tmp_path / "mih.json"
    argv = ["bench", "mih", "--store", str(tmp_path), "--queries", "30"]
    assert main([*argv, "--k", "5", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 470 and result["mih"]["recall"] == 1.0
    assert result["flat"]["recall"] == 1.0 and 0 <= result["faiss_multihash"]["recall"] <= 1


def test_bench_rejects_bad_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "index", "--n", "0", "--json", "unused.json"]) == 2
    assert "expected n >= 1, got 0" in capsys.readouterr().err


def test_recall_counts_ties_at_the_kth_distance_either_way() -> None:
    exact = (np.array([[1, 2, 2]]), np.array([[7, 8, 9]]))
    assert recall((np.array([[1, 2, 2]]), np.array([[7, 9, 5]])), exact) == 1.0
    assert recall((np.array([[1, 2, 3]]), np.array([[6, 9, 5]])), exact) == pytest.approx(1 / 3)


def test_clustered_codes_sit_near_their_centres() -> None:
    rng = np.random.default_rng(1)
    db, qs = make_data(rng, n=5000, n_bits=72, queries=50, clustered=True)
    assert db.shape == (5000, 2) and qs.shape == (50, 2)
    assert not (db[:, -1] >> np.uint64(8)).any()  # bits past 72 stay 0
    index = HammingIndex(72)
    index.add(db, np.arange(5000, dtype=np.int64))
    dists, _ = index.search(qs, 10)
    # 10% flips on both sides: neighbours within ~0.18 * 72 bits, far below a random 36.
    assert np.median(dists[:, -1]) < 18
