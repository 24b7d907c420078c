"""Load benchmark of the real service: text-search latency and throughput at 1, 8 and 32 clients
against `python -m service serve` on loopback, over N synthetic items; image-search latency with
and without micro-batching.

    .venv/bin/python -m scripts.bench_service --artifacts artifacts --n 100000 --json out.json

It copies the checkpoint from --artifacts into a temporary folder, writes an index generation of N
items there (random codes; captions cycled from the demo; every item points at one demo image),
starts the service on a free loopback port and drives it with client threads, each with its own
keep-alive connection. Clients and server share this machine's cores: the figures are a floor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from indexes.codes import pack_codes
from models.checkpoint import load_checkpoint
from service.local import serving
from store.layout import CHECKPOINT_NAME
from store.manifest import manifest_for
from store.store import NewItems, Store

QUERIES = [
    "a red car",
    "a small green tree on the left",
    "a yellow sun",
    "boat by the sea",
    "a large white moon in the night",
    "pink flower",
    "house",
    "two balloons",
]


def synthetic_artifacts(source: Path, target: Path, n: int, seed: int) -> None:
    """target/model.pt from source, and a generation of n random items."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / CHECKPOINT_NAME, target / CHECKPOINT_NAME)
    if (source / "demo" / "images").is_dir():  # the one image every item points at
        shutil.copytree(source / "demo" / "images", target / "demo" / "images", dirs_exist_ok=True)
    checkpoint = load_checkpoint(target / CHECKPOINT_NAME)
    rng = np.random.default_rng(seed)
    codes = [
        pack_codes(rng.choice(np.array([-1, 1], np.int8), size=(n, checkpoint.n_bits)))
        for _ in range(2)
    ]
    manifest = manifest_for(
        target / CHECKPOINT_NAME,
        n_bits=checkpoint.n_bits,
        backbone=checkpoint.image_backbone,
        vocabulary=checkpoint.vocabulary or [],
    )
    store = Store.create(target, manifest)
    try:
        store.add(
            NewItems(
                ids=list(range(n)),
                texts=[QUERIES[i % len(QUERIES)] for i in range(n)],  # demo-like captions
                images=["demo/images/00000.jpg"] * n,
                image_codes=codes[0],
                text_codes=codes[1],
            )
        )
    finally:
        store.close()


def drive(
    url: str, clients: int, seconds: float, request: str, payloads: Sequence[Any]
) -> dict[str, float]:
    """Run `clients` threads for `seconds`; latency percentiles (ms) and throughput (req/s)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(offset: int) -> None:
        local, bad = [], 0
        with httpx.Client(base_url=url, timeout=60) as client:
            i = offset
            while time.monotonic() < stop_at:
                payload = payloads[i % len(payloads)]
                t = time.perf_counter()
                if request == "text":
                    r = client.post("/v1/search/text", json=payload)
                else:
                    r = client.post(
                        "/v1/search/image",
                        files={"file": ("q.jpg", payload, "image/jpeg")},
                        data={"k": "10"},
                    )
                local.append(time.perf_counter() - t)
                bad += r.status_code != 200
                i += 1
        with lock:
            latencies.extend(local)
            errors[0] += bad

    start_time = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start_time
    ms = np.asarray(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "throughput_rps": round(len(latencies) / elapsed, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--artifacts", type=Path, default=Path("artifacts"), help="built demo artifacts"
    )
    parser.add_argument(
        "--n", type=int, nargs="+", default=[100_000, 1_000_000], help="index sizes"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each run")
    parser.add_argument("--k", type=int, default=10, help="hits per text search")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    text_rows: list[dict[str, Any]] = []
    image_rows: list[dict[str, Any]] = []
    texts = [{"text": q, "k": args.k, "target": t} for q in QUERIES for t in ("image", "text")]
    images = [
        p.read_bytes() for p in sorted((args.artifacts / "demo" / "images").glob("*.jpg"))[:32]
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            target = Path(tmp) / f"n{n}"
            synthetic_artifacts(args.artifacts, target, n, seed=0)
            with serving(target, ready_timeout_s=300, CMH_LOG_LEVEL="WARNING") as url:
                for clients in (1, 8, 32):
                    row = {"n": n, **drive(url, clients, args.seconds, "text", texts)}
                    print(json.dumps(row), flush=True)
                    text_rows.append(row)
        target = Path(tmp) / f"n{args.n[0]}"
        for label, env in (("batching", {}), ("no batching", {"CMH_MAX_IMAGE_BATCH": "1"})):
            with serving(target, ready_timeout_s=300, CMH_LOG_LEVEL="WARNING", **env) as url:
                for clients in (1, 8):
                    row = {"mode": label, **drive(url, clients, args.seconds, "image", images)}
                    print(json.dumps(row), flush=True)
                    image_rows.append(row)
    results = {"cpu_count": os.cpu_count(), "text": text_rows, "image": image_rows}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps({"median_text_p50_ms": statistics.median(r["p50_ms"] for r in text_rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
