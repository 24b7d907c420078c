"""One image search's encoding, end to end: where the time goes, and the batcher's thread count.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.image_latency --runs 5 \
        --json docs/results/bench-image-latency.json

What a search runs between the upload's bytes and the index: service.uploads.decode_image, then
service.encoder.MicroBatcher (the fast EfficientNet-Lite0 path of models.features.image) with
the service's defaults (5 ms window, batches of at most 32). The AUCMH network on the features
and the index search come after (well under a millisecond each; not measured here).

- `stages`: median ms of each stage of one image, run inline: `decode` (decode_image),
  `resize_crop` (crop_pixels), `to_tensor` (pixels_to_input), `net` (the packed network at batch
  1 on this thread, one torch thread), `features_inline` (encode_images from this one-thread
  thread: crop, tensor and network inline, what the batcher thread now runs for a lone image) and
  `features_pool` (the same handed to a backbone worker thread and back, as before).
- `lone`: 1 client, sequential: bytes -> decode_image -> MicroBatcher -> features, p50 / p90 ms,
  `all-cores` (the peer: the window only with company, a batch of one on the batcher's own
  thread with one torch thread per core) and `new` (the same, on the thread count the batcher
  timed faster when it started: fastest_lone_image_threads), alternating blocks of --block
  images so both meet the same load.
- `clients8`: 8 client threads, each decoding and submitting --per-client images one after the
  other: images/s and the mean batch size, all-cores against new, alternated per run.

The JSON: {"machine", "runs", "images", "stages": {stage: ms}, "lone": {"all-cores"/"new":
{"p50_ms", "p90_ms"}, "ratio_p50_all_cores": all-cores / new, "new_threads": the count new
chose}, "clients8": {"all-cores"/"new": {"images_per_s", "mean_batch"}},
"samples": [one row per run, with its load average]}: medians over runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.data.loaders import load_dataset
from models.features.image import (
    Backbone,
    cpu_cores,
    crop_pixels,
    encode_images,
    load_backbone,
    pixels_to_input,
)
from service.encoder import MicroBatcher
from service.uploads import decode_image

MAX_PIXELS = 40_000_000  # the service's default CMH_MAX_IMAGE_PIXELS
WINDOW_MS, MAX_BATCH = 5.0, 32  # the service's defaults (CMH_BATCH_WINDOW_MS, CMH_MAX_IMAGE_BATCH)
RULES = ("all-cores", "new")


def timed_ms(fn: Callable[..., object], *args: object) -> float:
    """Milliseconds that fn(*args) took."""
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1e3


def search_features(mb: MicroBatcher, blob: bytes) -> np.ndarray:
    """What a search does before the AUCMH network: decode the upload, features via the batcher."""
    image, _ = decode_image(blob, max_pixels=MAX_PIXELS)
    return mb.submit(image).result(timeout=120)


def pooled(bb: Backbone, image: Image.Image) -> np.ndarray:
    """One image's features handed to a backbone worker (from a thread of two torch threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # encode_images runs one image inline from a one-thread caller
    try:
        return encode_images(bb, [image], batch_size=1)
    finally:
        torch.set_num_threads(threads)


def stages(bb: Backbone, blobs: list[bytes]) -> dict[str, float]:
    """Median ms of each stage of one image, inline on this thread."""
    times: dict[str, list[float]] = {
        k: []
        for k in ("decode", "resize_crop", "to_tensor", "net", "features_inline", "features_pool")
    }
    for blob in blobs:
        start = time.perf_counter()
        image, _ = decode_image(blob, max_pixels=MAX_PIXELS)
        times["decode"].append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        pixels = crop_pixels(image)[None]
        times["resize_crop"].append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        x = pixels_to_input(bb, pixels)
        times["to_tensor"].append((time.perf_counter() - start) * 1e3)
        with torch.inference_mode():
            times["net"].append(timed_ms(bb.net, x))
        times["features_inline"].append(timed_ms(encode_images, bb, [image]))
        times["features_pool"].append(timed_ms(pooled, bb, image))
    return {k: statistics.median(v) for k, v in times.items()}


def lone(batchers: dict[str, MicroBatcher], blobs: list[bytes], *, block: int) -> dict[str, Any]:
    """p50 / p90 ms of one client's images through each rule's batcher, alternating blocks."""
    times: dict[str, list[float]] = {name: [] for name in RULES}
    for i, start in enumerate(range(0, len(blobs), block)):
        for name in RULES if i % 2 == 0 else RULES[::-1]:
            mb = batchers[name]
            times[name] += [timed_ms(search_features, mb, b) for b in blobs[start:][:block]]
    return {
        name: {"p50_ms": float(np.percentile(v, 50)), "p90_ms": float(np.percentile(v, 90))}
        for name, v in times.items()
    }


def clients(mb: MicroBatcher, blobs: list[bytes], *, n: int, per_client: int) -> dict[str, float]:
    """images/s and mean batch size of n concurrent clients, each sending per_client images."""
    before = len(mb.batch_sizes)
    go = threading.Barrier(n + 1)

    def client(c: int) -> None:
        go.wait()
        for j in range(per_client):
            search_features(mb, blobs[(c * per_client + j) % len(blobs)])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    sizes = mb.batch_sizes[before:]
    return {"images_per_s": n * per_client / wall, "mean_batch": float(np.mean(sizes))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("../shared/data/web-news"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--images", type=int, default=40, help="photos per run for lone and stages")
    p.add_argument("--block", type=int, default=10, help="images per block of one rule")
    p.add_argument("--per-client", type=int, default=6, help="images per client of clients8")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    torch.set_num_threads(1)  # stages run the packed network inline, as a worker does
    data = load_dataset("web-news", args.root)
    assert data.image_paths is not None
    step = max(1, len(data.image_paths) // args.images)
    blobs = [q.read_bytes() for q in data.image_paths[::step][: args.images]]
    bb = load_backbone("efficientnet-lite0", device=torch.device("cpu"))
    batchers = {
        name: MicroBatcher(
            bb,
            window_ms=WINDOW_MS,
            max_batch=MAX_BATCH,
            lone_threads=cpu_cores() if name == "all-cores" else None,
        )
        for name in RULES
    }
    for mb in batchers.values():
        search_features(mb, blobs[0])  # warm
    samples: list[dict[str, Any]] = []
    try:
        for run in range(args.runs):
            row: dict[str, Any] = {"run": run, "load_average": os.getloadavg()[0]}
            row["stages"] = stages(bb, blobs)
            row["lone"] = lone(batchers, blobs, block=args.block)
            row["clients8"] = {
                name: clients(batchers[name], blobs, n=8, per_client=args.per_client)
                for name in (RULES if run % 2 == 0 else RULES[::-1])
            }
            samples.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for mb in batchers.values():
            mb.close()

    def med(*keys: str) -> float:
        values = []
        for s in samples:
            v: Any = s
            for k in keys:
                v = v[k]
            values.append(v)
        return float(statistics.median(values))

    report: dict[str, Any] = {
        "machine": {
            "cores": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "workers": bb.workers,
            "load_average_median": med("load_average"),
        },
        "runs": args.runs,
        "images": len(blobs),
        "stages": {k: med("stages", k) for k in samples[0]["stages"]},
        "lone": {n: {q: med("lone", n, q) for q in ("p50_ms", "p90_ms")} for n in RULES},
        "clients8": {
            n: {q: med("clients8", n, q) for q in ("images_per_s", "mean_batch")} for n in RULES
        },
    }
    new_p50 = report["lone"]["new"]["p50_ms"]
    report["lone"]["ratio_p50_all_cores"] = report["lone"]["all-cores"]["p50_ms"] / new_p50
    report["lone"]["new_threads"] = batchers["new"].lone_threads
    report["samples"] = samples
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
