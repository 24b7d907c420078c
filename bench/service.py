"""`cmh bench service`: the served text and image search under load, against the framework's floor.

A real store of N synthetic items (bench/writes.py's: seeded random codes, demo-like captions)
next to a copy of a trained checkpoint, served by `python -m cli serve` as a user runs it; the
floor, `python -m bench.floor` (the same FastAPI, uvicorn, request and response models, no
work); both driven by wrk (a C load generator: the client is not what is measured), one keep-alive
connection per client, text searches cycling through demo-like queries (k 10, target image,
the server's default scoring).
Each run drives ours and the floor in turn at 1, 8 and 32 connections (who goes first alternates),
so a drift in a shared machine's load falls on both; figures are medians over the runs. Image
searches post one photo (multipart, k 10, target text) at 1 and 8 connections to ours with
micro-batching (the defaults) and to a second server over a copy of the store without it
(CMH_MAX_IMAGE_BATCH=1), alternated in the same way. Over 300 lines because it is one benchmark's
parts (wrk scripts and parsing, the store, the processes, the alternation), each a small function.

JSON keys ("median" = over `runs`; latencies from wrk --latency, ms):
  n, runs, duration_s         store size, runs, seconds of each wrk run
  ours[c], floor[c]           c in "1", "8", "32": median p50_ms, p99_ms, rps (requests/s), and
                              errors (non-2xx responses and socket errors, summed over the runs)
  ratio_rps[c]                ours rps / floor rps (the medians)
  image[mode][c]              mode "batching" / "no_batching", c in "1", "8": as ours[c]
  scoring[s][c]               (--scorings) s in "hamming", "asymmetric": as ours[c], the same
                              server driven with each scoring in turn
  scoring_ratio_p50[c]        asymmetric p50 / hamming p50 (the medians)
  per_run                     every wrk run's figures: {server: {c: [run, ...]}}
  targets                     issue 14's goals: value, limit, op, pass
  image_path, wrk, python, cpu_count, notes
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.local import serving, serving_command, synthetic_artifacts
from bench.writes import caption_pool
from common.errors import InputError

logger = logging.getLogger(__name__)

CONNECTIONS = (1, 8, 32)  # text search
SCORINGS = ("hamming", "asymmetric")  # the text search's rankings, side by side
IMAGE_CONNECTIONS = (1, 8)
QUERIES = 64  # distinct text queries, cycled by every connection
K = 10
WARMUP_S = 2.0  # a discarded wrk run per server before the first measured one
READY_TIMEOUT_S = 600.0  # a 10M store takes a while to open
WRK_INSTALL = (
    "install it with `apt-get install wrk` (Debian and Ubuntu; `brew install wrk` on macOS)"
)
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def require_wrk() -> str:
    """The wrk executable, or InputError saying how to install it."""
    path = shutil.which("wrk")
    if path is None:
        raise InputError(f"expected the wrk load generator on PATH, got none: {WRK_INSTALL}")
    return path


def parse_wrk(output: str) -> dict[str, float]:
    """p50_ms, p99_ms, rps, requests and errors from the text wrk --latency prints."""

    def duration_ms(label: str) -> float:
        found = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"expected a {label} latency line in wrk's output, got:\n{output}")
        return float(found.group(1)) * UNITS_MS[found.group(2)]

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    requests = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    if rps is None or requests is None:
        raise RuntimeError(f"expected wrk's Requests/sec and request count, got:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket:
        errors += sum(int(g) for g in socket.groups())
    return {
        "p50_ms": duration_ms("50%"),
        "p99_ms": duration_ms("99%"),
        "rps": float(rps.group(1)),
        "requests": float(requests.group(1)),
        "errors": float(errors),
    }


def _lua_string(data: bytes) -> str:
    """A Lua string literal holding exactly `data` (decimal escapes for anything unusual)."""
    return (
        '"' + "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\{b}" for b in data) + '"'
    )


def text_script(path: Path, queries: list[str], *, scoring: str | None = None) -> Path:
    """A wrk script posting TextSearch bodies of `queries` in turn, k 10, target image (and
    `scoring` when given; else the server's default)."""
    asked = {} if scoring is None else {"scoring": scoring}
    bodies = [
        json.dumps({"text": q, "k": K, "target": "image", **asked}).encode("utf-8") for q in queries
    ]
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{{', '.join(_lua_string(b) for b in bodies)}}}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i + 1\n"
        '  return wrk.format(nil, "/v1/search/text", nil, bodies[(i % #bodies) + 1])\n'
        "end\n"
    )
    return path


def image_script(path: Path, image: Path) -> Path:
    """A wrk script posting `image` as a multipart search (file, k 10, target text)."""
    boundary = "cmhbenchboundary7f3a"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{K}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="target"\r\n\r\ntext\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    body = path.with_suffix(".body")
    body.write_bytes(head + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"\n'
        f'local f = assert(io.open({_lua_string(str(body).encode())}, "rb"))\n'
        'wrk.body = f:read("*a")\n'
        "f:close()\n"
        'wrk.path = "/v1/search/image"\n'
    )
    return path


def run_wrk(url: str, script: Path, *, connections: int, seconds: float) -> dict[str, float]:
    """One wrk run (one thread) against url with script; its parsed figures."""
    command = [
        require_wrk(), "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s",
        "--timeout", "30s", "--latency", "-s", str(script), url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"expected wrk to succeed, got exit {done.returncode}:\n{done.stderr}")
    return parse_wrk(done.stdout)


@contextmanager
def floor_serving(*, workers: int = 1, ready_timeout_s: float = 60.0) -> Iterator[str]:
    """`python -m bench.floor` on a free loopback port until the block ends; yields its URL."""
    command = [sys.executable, "-m", "bench.floor", "--workers", str(workers)]
    with serving_command(command, ready_timeout_s=ready_timeout_s) as url:
        yield url


def _alternated(
    servers: dict[str, str],
    script: Path | dict[str, Path],
    *,
    connections: tuple[int, ...],
    runs: int,
    seconds: float,
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """{server: {c: [figures per run]}}, the servers taken in turn, the first one alternating;
    `script` is every server's, or each one's by name."""
    names = list(servers)
    scripts = script if isinstance(script, dict) else dict.fromkeys(names, script)
    out: dict[str, dict[str, list[dict[str, float]]]] = {s: {} for s in names}
    for name in names:  # warm-up: kernels, connections, caches; discarded
        run_wrk(servers[name], scripts[name], connections=max(connections), seconds=WARMUP_S)
    for run in range(runs):
        for i, c in enumerate(connections):
            order = names if (run + i) % 2 == 0 else names[::-1]
            for name in order:
                figures = run_wrk(servers[name], scripts[name], connections=c, seconds=seconds)
                out[name].setdefault(str(c), []).append(figures)
                logger.info("run %d, %s, %d connections: %s", run + 1, name, c, figures)
    return out


def _medians(per_run: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {
        c: {
            "p50_ms": statistics.median(r["p50_ms"] for r in rows),
            "p99_ms": statistics.median(r["p99_ms"] for r in rows),
            "rps": statistics.median(r["rps"] for r in rows),
            "errors": sum(r["errors"] for r in rows),
        }
        for c, rows in per_run.items()
    }


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 14's goals for text search, each with its value and whether it passes."""
    ours, floor = result["ours"], result["floor"]

    def goal(value: float, limit: float, op: str) -> dict[str, Any]:
        passed = value <= limit if op == "<=" else value >= limit
        return {"value": value, "limit": limit, "op": op, "pass": passed}

    out = {f"ratio_rps_{c}": goal(result["ratio_rps"][c], 0.6, ">=") for c in result["ratio_rps"]}
    out["p50_1_ms"] = goal(ours["1"]["p50_ms"], floor["1"]["p50_ms"] + 0.5, "<=")
    out["p99_32_ms"] = goal(ours["32"]["p99_ms"], 2 * floor["32"]["p99_ms"], "<=")
    return out


def bench_service(
    *,
    checkpoint: Path,
    root: Path,
    n: int,
    runs: int,
    seconds: float,
    image: Path | None,
    workers: int = 1,
    scorings: bool = False,
) -> dict[str, Any]:
    """Build the store under root (an empty folder), serve it and the floor, drive both: JSON.

    Both apps run in `workers` processes, so the ratio compares like with like. With
    `scorings`, the same server is then driven with Hamming and asymmetric text searches in
    turn (keys "scoring" and "scoring_ratio_p50").
    """
    if n < 1 or runs < 1 or seconds <= 0 or workers < 1:
        raise InputError(
            "expected n >= 1, runs >= 1, a positive duration and workers >= 1, got "
            f"{n}, {runs}, {seconds}, {workers}"
        )
    if not checkpoint.is_file():
        raise InputError(
            f"expected a trained checkpoint at {checkpoint} (build the demo's with `cmh demo build "
            f"--artifacts {checkpoint.parent}`), got no file"
        )
    if image is not None and not image.is_file():
        raise InputError(f"expected an image file at {image}, got none")
    wrk = require_wrk()
    ours_dir = root / "ours"
    logger.info("building a store of %d synthetic items in %s", n, ours_dir)
    synthetic_artifacts(checkpoint, ours_dir, n=n)
    if image is not None:  # one server per store (it holds the store's lock): a copy for the other
        shutil.copytree(ours_dir, root / "no-batching")
    queries = caption_pool()[:QUERIES].tolist()
    text = text_script(root / "text.lua", queries)
    quiet = {"CMH_LOG_LEVEL": "WARNING"}
    result: dict[str, Any] = {"n": n, "runs": runs, "duration_s": seconds, "workers": workers}
    processes = ("--workers", str(workers))
    with ExitStack() as stack:
        ours = stack.enter_context(
            serving(ours_dir, args=processes, ready_timeout_s=READY_TIMEOUT_S, **quiet)
        )
        floor = stack.enter_context(floor_serving(workers=workers))
        per_run = _alternated(
            {"ours": ours, "floor": floor},
            text,
            connections=CONNECTIONS,
            runs=runs,
            seconds=seconds,
        )
        if scorings:
            bodies = {
                name: text_script(root / f"text-{name}.lua", queries, scoring=name)
                for name in SCORINGS
            }
            ranked = _alternated(
                dict.fromkeys(SCORINGS, ours),
                bodies,
                connections=CONNECTIONS,
                runs=runs,
                seconds=seconds,
            )
            per_run |= {f"scoring-{name}": figures for name, figures in ranked.items()}
            result["scoring"] = {name: _medians(ranked[name]) for name in SCORINGS}
            result["scoring_ratio_p50"] = {
                c: result["scoring"]["asymmetric"][c]["p50_ms"]
                / result["scoring"]["hamming"][c]["p50_ms"]
                for c in result["scoring"]["hamming"]
            }
        if image is not None:
            single = stack.enter_context(
                serving(
                    root / "no-batching", args=processes, ready_timeout_s=READY_TIMEOUT_S,
                    CMH_MAX_IMAGE_BATCH="1", **quiet,
                )
            )  # fmt: skip
            images = _alternated(
                {"batching": ours, "no_batching": single},
                image_script(root / "image.lua", image),
                connections=IMAGE_CONNECTIONS,
                runs=runs,
                seconds=seconds,
            )
            per_run |= images
            result["image"] = {mode: _medians(images[mode]) for mode in images}
    result["ours"], result["floor"] = _medians(per_run["ours"]), _medians(per_run["floor"])
    result["ratio_rps"] = {
        c: result["ours"][c]["rps"] / result["floor"][c]["rps"] for c in result["ours"]
    }
    result["targets"] = targets(result)
    version = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    result |= {
        "per_run": per_run,
        "image_path": str(image) if image is not None else None,
        "wrk": " ".join((version.stdout + version.stderr).split()[:2]),  # "wrk 4.1.0"
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "notes": (
            f"text: POST /v1/search/text, {QUERIES} demo-like queries in turn, k={K}, target "
            f"image; ours = `python -m cli serve --workers {workers}` (CMH_LOG_LEVEL="
            f"WARNING) over one compacted segment of {n} synthetic items and the given "
            f"checkpoint, floor = `python -m bench.floor --workers {workers}`; wrk 1 thread, "
            "keep-alive, --latency; servers, wrk and anything else "
            "running share this machine's cores"
        ),
    }
    return result
