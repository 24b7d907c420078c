"""`cmh bench writes` on a tiny store: the documented keys, and figures that agree with each other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.writes import bench_writes, captions, synthetic_items
from cli.main import main

TIMINGS = (
    "ingest_items_per_s",
    "ingest_s",
    "compaction_s",
    "add_1_ms",
    "add_1000_ms",
    "delete_1_ms",
    "delete_1000_ms",
    "search_p50_idle_ms",
    "search_p99_idle_ms",
    "search_p50_ingest_ms",
    "search_p99_ingest_ms",
    "ingest_during_search_items_per_s",
    "startup_s",
    "startup_process_s",
    "open_s",
    "rss_mb",
    "rss_empty_mb",
    "rss_anon_mb",
    "rss_file_mb",
    "disk_bytes_per_item",
)
PEERS = ("fsync_ms", "sqlite_commit_1_ms", "sqlite_ingest_items_per_s", "view_search_p50_ms")
TARGETS = {
    "add_1_ms": "add_1_ms",
    "delete_1_ms": "delete_1_ms",
    "startup_s": "startup_s",
    "ingest_items_per_s": "ingest_items_per_s",
}


def test_bench_writes_reports_consistent_figures(tmp_path: Path) -> None:
    n, repeats, batch = 3000, 2, 1000
    result = bench_writes(root=tmp_path, n=n, n_bits=64, repeats=repeats, batch=batch, queries=40)
    assert (result["n"], result["bits"], result["repeats"], result["batch"]) == (n, 64, 2, 1000)
    assert result["queries"] == 40 and result["threads"] >= 1 and result["python"]
    assert len(result["store_sha256"]) == 64
    for key in TIMINGS:
        assert result[key] > 0, key
    for key in PEERS:
        assert result["peers"][key] > 0, key
    assert result["ingest_items_per_s"] == pytest.approx(n / result["ingest_s"])
    disk = result["disk_bytes"]
    assert disk["db"] > 0 and disk["wal"] > 0
    assert result["disk_bytes_per_item"] == pytest.approx(sum(disk.values()) / n)
    # Batches below the store's bulk size stay in the growing part: one part, no segment file.
    assert result["segments"] == result["segments_compacted"] == 1 and disk["segments"] == 0
    # Every add (timed, warm-up and during searches) was a growing row the children reloaded.
    trickled = result["growing_rows"] - n - (1 + 1000) * (1 + repeats)
    assert trickled > 0 and trickled % 100 == 0
    assert result["search_p50_idle_ms"] <= result["search_p99_idle_ms"]
    assert result["search_p50_ingest_ms"] <= result["search_p99_ingest_ms"]
    assert result["open_s"] <= result["startup_s"] <= result["startup_process_s"]
    assert result["rss_anon_mb"] + result["rss_file_mb"] <= result["rss_mb"] + 1
    ratios = result["ratios"]
    p99 = result["search_p99_ingest_ms"] / result["search_p99_idle_ms"]
    assert ratios["search_p99_ingest_over_idle"] == pytest.approx(p99)
    add_ratio = result["add_1_ms"] / result["peers"]["sqlite_commit_1_ms"]
    assert ratios["add_1_over_sqlite_commit_1"] == pytest.approx(add_ratio)
    targets = result["targets"]
    assert set(targets) == set(TARGETS) | {"rss_above_empty_mb", "search_p99_ingest_over_idle"}
    for name, key in TARGETS.items():
        assert targets[name]["value"] == result[key]
    above = result["rss_mb"] - result["rss_empty_mb"]
    assert targets["rss_above_empty_mb"]["value"] == pytest.approx(above)
    for target in targets.values():
        op, value, limit = target["op"], target["value"], target["limit"]
        assert target["pass"] == (value <= limit if op == "<=" else value >= limit)
    assert "warm page cache" in result["notes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "items", "peers"]


def test_synthetic_items_are_seeded_and_valid() -> None:
    first = synthetic_items(np.random.default_rng(3), 10, 5, 48)
    again = synthetic_items(np.random.default_rng(3), 10, 5, 48)
    assert list(first.ids) == [10, 11, 12, 13, 14] and first.texts == again.texts
    assert first.images[0] == "images/10.jpg"
    assert np.array_equal(first.image_codes, again.image_codes)
    assert first.image_codes.shape == (5, 1) and not (first.image_codes >> np.uint64(48)).any()
    text = captions(np.random.default_rng(0), 200)
    assert all(t.startswith("a ") and t.count(",") >= 1 for t in text)


def test_bench_writes_refuses_a_store_too_small_for_its_deletes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "writes", "--n", "100", "--repeats", "2", "--json", "unused.json"]) == 2
    assert "expected n >= 2004 for 2 repeats, got 100" in capsys.readouterr().err


MILVUS_TIMINGS = (
    "ingest_items_per_s",
    "add_1_ms",
    "add_1000_ms",
    "delete_1_ms",
    "delete_1000_ms",
    "search_p50_ms",
    "search_p99_ms",
    "visible_ms_p50",
    "visible_ms_max",
)


def test_bench_writes_on_milvus_reports_its_keys_and_cleans_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cmh bench writes --backend milvus` against a milvus-lite server it starts: the keys of
    bench/milvus_writes.py, with figures that agree with each other."""
    out = tmp_path / "milvus.json"
    args = ["bench", "writes", "--backend", "milvus", "--n", "2500", "--repeats", "2"]
    args += ["--batch", "500", "--queries", "10", "--dir", str(tmp_path), "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "milvus" and result["n"] == 2500 and result["bits"] == 64
    assert result["uri"].startswith("http://127.0.0.1:") and result["milvus_lite"] == "2.5.1"
    for key in MILVUS_TIMINGS:
        assert result[key] > 0, key
    assert set(result["add_1_ms_at"]) == {"250", "2500"}
    assert result["add_1_ms"] == result["add_1_ms_at"]["2500"]
    assert result["search_p50_ms"] <= result["search_p99_ms"]
    assert result["visible_ms_p50"] <= result["visible_ms_max"]
    assert 0 <= result["visible_first_get"] <= 1
    assert result["peers"]["local_add_1_ms"] > 0
    assert set(result["peers"]["pk_query_ms_at"]) == {"250", "2500"}
    assert "Strong consistency" in result["notes"]
    assert list(tmp_path.glob("cmh-bench-writes-*")) == []  # the folder and server are gone
    memory = ["bench", "writes", "--backend", "memory", "--uri", "http://x:1"]
    assert main([*memory, "--json", str(out)]) == 2
    assert "expected --uri with --backend milvus only" in capsys.readouterr().err
