"""`cmh bench service`: one line and exit 2 without wrk; with wrk, a tiny real run's JSON keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.service import parse_wrk

PROJECT = Path(__file__).resolve().parents[1]

# What wrk 4.1 prints with --latency (a run at 32 connections; wrk pads "1.18s" with a space).
WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8102
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   181.04ms  179.58ms   1.99s    95.71%
    Req/Sec   209.66     37.79   343.00     73.00%
  Latency Distribution
     50%  143.77ms
     75%  161.79ms
     90%  185.36ms
     99%    1.18s
  2091 requests in 10.02s, 3.65MB read
  Socket errors: connect 0, read 0, write 0, timeout 5
  Non-2xx or 3xx responses: 2
Requests/sec:    208.65
Transfer/sec:    373.40KB
""".replace("1.18s\n", "1.18s \n")


def _bench(tmp_path: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path if path is not None else os.environ.get("PATH", "")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "bench",
            "service",
            "--json",
            str(tmp_path / "out.json"),
            *args,
        ],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_wrk_output_is_parsed_with_its_units_and_errors() -> None:
    figures = parse_wrk(WRK_OUTPUT)
    assert figures == {
        "p50_ms": 143.77,
        "p99_ms": 1180.0,
        "rps": 208.65,
        "requests": 2091.0,
        "errors": 7.0,  # 5 timeouts and 2 non-2xx responses
    }


def test_without_wrk_it_says_how_to_install_it_and_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    done = _bench(tmp_path, "--n", "2000", "--artifacts", str(tmp_path), path=str(empty))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "wrk" in lines[0] and "apt-get install wrk" in lines[0]
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)
def test_a_tiny_real_run_writes_the_documented_keys(
    tmp_path: Path, demo_artifacts_master: Path
) -> None:
    done = _bench(
        tmp_path, "--n", "2000", "--runs", "1", "--duration", "1",
        "--artifacts", str(demo_artifacts_master), "--dir", str(tmp_path / "work"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["n"] == 2000 and result["runs"] == 1
    for c in ("1", "8", "32"):
        for server in ("ours", "floor"):
            figures = result[server][c]
            assert {"p50_ms", "p99_ms", "rps"} <= set(figures)
            assert figures["rps"] > 0 and 0 < figures["p50_ms"] <= figures["p99_ms"]
            assert figures["errors"] == 0
        assert result["ratio_rps"][c] == pytest.approx(
            result["ours"][c]["rps"] / result["floor"][c]["rps"]
        )
    for mode in ("batching", "no_batching"):
        for c in ("1", "8"):
            assert result["image"][mode][c]["rps"] > 0 and result["image"][mode][c]["errors"] == 0
    assert set(result["targets"]) == {
        "ratio_rps_1", "ratio_rps_8", "ratio_rps_32", "p50_1_ms", "p99_32_ms"
    }  # fmt: skip
    assert not list((tmp_path / "work").iterdir())  # the temporary store is removed
