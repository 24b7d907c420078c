"""Retrain and switch at scale: the figures of README "Retraining the served collection".

    .venv/bin/python -m bench.versions --items 100000 --json docs/results/versions-100k.json

On a fresh folder: N synthetic photos (distinct 64x64 images, seeded) with captions whose last
words appear only after the first TRAIN_FIRST pairs, a first model trained on those, a store of
all N built by `cmh index build`, served by `cmh serve` (one worker). Then, with the server up,
each step as a user runs it, each in its own process (peak RSS from /usr/bin/time):
- `cmh train --from-store` with the feature cache cold, then again with it warm;
- `cmh index reindex` with the new model, while one client searches sequentially (p50/p99
  against the same client's figures on the idle server, before);
- POST /v1/admin/reload (the switch, as the client sees it and as the server reports it);
- disk per version (GET /v1/index/stats).
Training runs `--epochs` epochs (default 10, the README says which) of the paper's row.

`--backend milvus`: the same rounds on the Milvus backend (store/milvus_versions.py), over a
milvus-lite server started here on WORK/milvus.db, the local store migrated into it first
(`cmh index migrate --to milvus`, timed); reindexes then go to collections beside it and the
switches move the pointer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw

from bench.local import serving
from store.milvus_lite import MilvusLite

TRAIN_FIRST = 2000  # pairs the first model is trained on (the rest hold words it never saw)
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["disc", "square", "bar", "ring"]
PLACES = ["beach", "street", "garden", "market", "harbour", "station"]
NEW = ["crimson", "emerald", "sapphire", "amber", "violet", "tangerine", "onyx", "ivory"]
QUERIES = ["red disc", "a green square", "blue bar on the street", "yellow ring", "market"]


def photos(root: Path, n: int, seed: int = 0) -> None:
    """n distinct photos and their pairs.jsonl (captions name colour, shape and place)."""
    rng = random.Random(seed)
    (root / "photos").mkdir(parents=True)
    with (root / "pairs.jsonl").open("w") as out:
        for i in range(n):
            c, s, p = rng.randrange(8), rng.randrange(4), rng.randrange(6)
            image = Image.new("RGB", (64, 64), (i % 251, (i // 251) % 251, 200))
            draw = ImageDraw.Draw(image)
            box = (8 + s * 3, 8 + c * 2, 56 - p * 2, 56 - s)
            fill = (40 + c * 25, 200 - c * 20, 60 + s * 40)
            (draw.ellipse if s % 2 == 0 else draw.rectangle)(box, fill=fill)
            name = f"photos/{i:06d}.png"
            image.save(root / name)
            words = [COLOURS[c], SHAPES[s], "on the", PLACES[p]]
            if i >= TRAIN_FIRST:  # words the first model never saw
                words.insert(1, NEW[c])
            record = {"id": f"p{i}", "image": name, "text": "a " + " ".join(words)}
            out.write(json.dumps(record) + "\n")


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run `cmh ARGS` in its own process: (seconds, peak RSS in MiB, its stdout)."""
    command = ["/usr/bin/time", "-f", "maxrss_kib=%M", sys.executable, "-m", "cli", *args]
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"cmh {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    kib = int(re.findall(r"maxrss_kib=(\d+)", done.stderr)[-1])
    return seconds, kib / 1024, done.stdout


class Searcher:
    """One client searching sequentially until stopped; its latencies in ms."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ms: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = 0
            while not self._stop.is_set():
                query = {"text": QUERIES[i % len(QUERIES)], "k": 10}
                start = time.perf_counter()
                answer = client.post("/v1/search/text", json=query)
                self.ms.append((time.perf_counter() - start) * 1000)
                self.failed += answer.status_code != 200
                i += 1
                time.sleep(0.01)

    def __enter__(self) -> Searcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def quantiles(ms: list[float]) -> dict[str, float]:
    """p50 and p99 of latencies, ms."""
    cuts = statistics.quantiles(ms, n=100)
    return {"p50_ms": round(cuts[49], 2), "p99_ms": round(cuts[98], 2), "n": len(ms)}


def setup(work: Path, items: int, quick: list[str]) -> dict[str, float]:
    """Photos, a first model trained on TRAIN_FIRST pairs, a store of all items: the folder a
    user would serve. What it took (not a figure of the switch)."""
    data, artifacts = work / "data", work / "artifacts"
    start = time.perf_counter()
    photos(data, items)
    first = data / "first"
    first.mkdir()
    lines = (data / "pairs.jsonl").read_text().splitlines()[:TRAIN_FIRST]
    (first / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (first / "photos").mkdir()
    for line in lines:  # the same files (a dataset's images must lie inside its root)
        name = json.loads(line)["image"]
        os.link(data / name, first / name)
    train = ["train", "--dataset", "pairs", "--root", str(first)]
    cli(*train, "--cache-dir", str(work / "cache"), "--out", str(artifacts / "model.pt"), *quick)
    seconds, _, _ = cli(
        "index", "build", "--artifacts", str(artifacts), "--dataset", "pairs",
        "--root", str(data), "--device", "cpu",
    )  # fmt: skip
    return {"index_build_s": round(seconds, 1), "total_s": round(time.perf_counter() - start, 1)}


def switch_round(
    url: str, artifacts: Path, model: Path, idle_s: float, nice: int, env: dict[str, str]
) -> dict[str, Any]:
    """Idle searches, a reindex under searches, the switch: one round's figures."""
    with Searcher(url) as idle:
        time.sleep(idle_s)
    with Searcher(url) as busy:
        seconds, rss, out = cli(
            "index", "reindex", "--artifacts", str(artifacts), "--model", str(model),
            "--device", "cpu", "--nice", str(nice), env=env,
        )  # fmt: skip
    rate = re.search(r"in ([0-9.]+) s \(([0-9]+) items/s\)", out)
    figures: dict[str, Any] = {
        "search_idle": quantiles(idle.ms),
        "reindex": {
            "s": round(seconds, 1),
            "copy_items_per_s": int(rate.group(2)) if rate else None,
            "peak_rss_mib": round(rss),
            "said": out.strip(),
        },
        "search_during_reindex": quantiles(busy.ms),
        "search_failed": idle.failed + busy.failed,
    }
    figures["search_p99_ratio"] = round(
        figures["search_during_reindex"]["p99_ms"] / figures["search_idle"]["p99_ms"], 2
    )
    with httpx.Client(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        switched = client.post("/v1/admin/reload")
        figures["switch"] = {"client_s": round(time.perf_counter() - start, 3)}
        figures["switch"]["server"] = switched.json()
        stats = client.get("/v1/index/stats").json()
        figures["versions"] = stats["versions"]
        known = client.post("/v1/search/text", json={"text": "crimson"}).json()
        figures["new_word_known_after_switch"] = not known["no_known_words"]
    return figures


@contextmanager
def milvus_backend(work: Path, artifacts: Path, result: dict[str, Any]) -> Iterator[dict[str, str]]:
    """A milvus-lite server on WORK/milvus.db holding the local store's items (migrated on the
    first run, timed in result["migrate_s"]); yields the CMH_* variables that name it."""
    server = MilvusLite(work / "milvus.db")
    server.start()
    try:
        env = {
            "CMH_INDEX_BACKEND": "milvus",
            "CMH_MILVUS_URI": server.uri,
            "CMH_MILVUS_COLLECTION": "cmh_items",
            "CMH_MILVUS_TIMEOUT_S": "60",
        }
        if not (work / "milvus.migrated").exists():
            seconds, _, _ = cli(
                "index", "migrate", "--artifacts", str(artifacts), "--to", "milvus",
                "--uri", server.uri, "--timeout-s", "60",
            )  # fmt: skip
            result["migrate_s"] = round(seconds, 1)
            (work / "milvus.migrated").touch()
        yield env
    finally:
        server.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000, help="items in the store")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (each retrain)")
    parser.add_argument("--idle-s", type=float, default=30.0, help="seconds of idle searches")
    parser.add_argument("--rounds", type=int, default=3, help="reindex and switch rounds")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder to keep (default: temp); one already set up (and retrained, with "
        "--skip-retrain) is reused",
    )
    parser.add_argument("--skip-retrain", action="store_true", help="reuse WORK/new.pt")
    parser.add_argument("--nice", type=int, default=10, help="cmh index reindex --nice")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument(
        "--backend", choices=("memory", "milvus"), default="memory", help="the store's backend"
    )
    args = parser.parse_args()
    result: dict[str, Any] = {
        "items": args.items,
        "epochs": args.epochs,
        "cpus": os.cpu_count(),
        "reindex_nice": args.nice,
        "backend": args.backend,
    }
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as running:
        work = args.work or Path(tmp)
        artifacts, model = work / "artifacts", work / "new.pt"
        quick = ["--method", "aucmh", "--k", "20", "--epochs", str(args.epochs), "--device", "cpu"]
        if not (artifacts / "model.pt").is_file():
            result["setup"] = setup(work, args.items, quick)
            print(json.dumps(result), flush=True)
        env = {"CMH_LOG_LEVEL": "WARNING"}
        if args.backend == "milvus":
            env.update(running.enter_context(milvus_backend(work, artifacts, result)))
        with serving(artifacts, ready_timeout_s=600, **env) as url:
            if not args.skip_retrain:
                retrain = ["train", "--from-store", str(artifacts), "--out", str(model)]
                for kind in ("cold", "warm"):
                    seconds, rss, _ = cli(*retrain, *quick, env=env)
                    result[f"retrain_{kind}"] = {"s": round(seconds, 1), "peak_rss_mib": round(rss)}
                    print(json.dumps(result), flush=True)
            rounds = [
                switch_round(url, artifacts, model, args.idle_s, args.nice, env)
                for _ in range(args.rounds)
            ]
    result["rounds"] = rounds
    result["median"] = {
        "search_idle_p99_ms": statistics.median(r["search_idle"]["p99_ms"] for r in rounds),
        "search_during_reindex_p99_ms": statistics.median(
            r["search_during_reindex"]["p99_ms"] for r in rounds
        ),
        "search_p99_ratio": statistics.median(r["search_p99_ratio"] for r in rounds),
        "reindex_s": statistics.median(r["reindex"]["s"] for r in rounds),
        "reindex_copy_items_per_s": statistics.median(
            r["reindex"]["copy_items_per_s"] or 0 for r in rounds
        ),
        "switch_s": statistics.median(r["switch"]["server"]["seconds"] for r in rounds),
        "search_failed": sum(r["search_failed"] for r in rounds),
    }
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
