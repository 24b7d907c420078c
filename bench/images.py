"""Image features on the CPU: the fast path against the reference path, side by side in one run.

    .venv/bin/python -m bench.images --root ../shared/data/web-news --runs 3 \
        --json docs/results/bench-images.json

Both paths are models.features.image.load_backbone("efficientnet-lite0") on the CPU: the
reference (`fast=False`, today's code: the package's network, full JPEG decodes, torchvision
ToTensor + Normalize, one batch at a time over the process's torch threads) and the fast one
(the default). Throughput and latency alternate the two block by block (--block images, A B,
B A, A B, ...), so that both meet the same load from other processes; medians over --runs:

- `throughput`: images/s of encode_images over --n image paths (default batch size): what
  `cmh features` (models.features.pipeline.cached_image_features) runs, decoding included; and the
  process CPU time per image (all threads), which other processes' load inflates less.
- `latency`: one image at a time as the service gets it, JPEG bytes in memory -> decoded RGB
  image -> its features through encode_images (the reference decodes in full as
  service.uploads.decode_image did before it drafted; the fast one calls draft_jpeg first, as
  decode_image now does); p50 / p90 ms over --latency-images photos per run, blocks of
  --block / 5.
- `batcher`: the same single image through service.encoder.MicroBatcher (1 client, sequential),
  p50 ms, for each --windows value (the batch_window_ms setting); reference at 5 ms, today's
  default, and fast at every window.
- `tolerance`: the fast path's features against the reference's over the --n images of the first
  run: cosine min / 1st percentile / median, largest absolute difference, and the agreement of
  the ImageNet top-1 class (the package's classifier on the pooled features).
- `breakdown`: median ms per image of each stage (per run, over --breakdown-images photos):
  `decode` (full, and `decode_draft`), `resize_crop` (the bicubic resize and centre crop),
  `to_tensor` (reference ToTensor + Normalize, fast pixels_to_input), and the networks alone at
  batch 1 and 32: `net_reference_tN` (the package's network, N torch threads), `net_fused_t1`
  (batch norm folded, generic torch ops), `net_packed_tN` (oneDNN, packed under N threads;
  t1 is what each fast-path worker runs).

The JSON has {"machine": {...}, "n", "runs", "reference": {key: median}, "fast": {key: median},
"ratio": {key: fast / reference for images/s, reference / fast for times}, "tolerance": {...},
"breakdown": {stage: median ms}, "batcher": {"reference_5ms": p50, "fast_<w>ms": p50},
"samples": [one row per run]}.
Timings on a machine other processes share are noisy: compare the ratios of one run.

Over 300 lines because it is one benchmark: both paths, their timing blocks and the tolerance
checks that make the comparison fair.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.data.loaders import load_dataset
from models.features.image import (
    Backbone,
    crop_pixels,
    draft_jpeg,
    encode_images,
    load_backbone,
    load_efficientnet_lite,
    pixels_to_input,
    to_rgb,
)
from models.features.lite_fused import fuse_lite, pack_for_cpu
from service.encoder import MicroBatcher

PATHS = ("reference", "fast")


def decode(data: bytes, *, draft: bool) -> Image.Image:
    """JPEG (or other) bytes -> RGB image, as the service decodes an upload."""
    with Image.open(io.BytesIO(data)) as im:
        if draft:
            draft_jpeg(im)
        im.load()
        return to_rgb(im)


def ms(seconds: Sequence[float], q: float = 50) -> float:
    """The q-th percentile of durations in seconds, in ms."""
    return float(np.percentile(np.asarray(seconds) * 1e3, q))


def timed(fn: Callable[..., object], *args: object) -> float:
    """Seconds that fn(*args) took."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def encode_bytes(bb: Backbone, blob: bytes) -> np.ndarray:
    """Decode (drafted on the fast path) and encode one image, as a search does."""
    return encode_images(bb, [decode(blob, draft=bb.fast)], batch_size=1)


def through_batcher(mb: MicroBatcher, blob: bytes) -> np.ndarray:
    """Decode one image and wait for its features from the micro-batcher."""
    return mb.submit(decode(blob, draft=mb.backbone.fast)).result()


def ordered(run: int) -> tuple[str, str]:
    return PATHS if run % 2 == 0 else (PATHS[1], PATHS[0])


def throughput(
    backbones: dict[str, Backbone], paths: list[Path], *, block: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """({images_per_s_P, cpu_ms_per_image_P}, {P: features}) of each path P over all the paths.

    The paths alternate block by block (A B, B A, A B, ...), so both see the same load.
    """
    wall = dict.fromkeys(PATHS, 0.0)
    cpu = dict.fromkeys(PATHS, 0.0)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in PATHS}
    for i, start in enumerate(range(0, len(paths), block)):
        for name in ordered(i):
            w, c = time.perf_counter(), time.process_time()
            parts[name].append(encode_images(backbones[name], paths[start : start + block]))
            wall[name] += time.perf_counter() - w
            cpu[name] += time.process_time() - c
    out = {f"images_per_s_{name}": len(paths) / wall[name] for name in PATHS}
    out |= {f"cpu_ms_per_image_{name}": cpu[name] / len(paths) * 1e3 for name in PATHS}
    return out, {name: np.concatenate(parts[name]) for name in PATHS}


def tolerance(feats: dict[str, np.ndarray]) -> dict[str, float]:
    """Cosines of fast against reference features, and their ImageNet top-1 agreement."""
    ref, fast = feats["reference"], feats["fast"]
    cos = (ref * fast).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(fast, axis=1)
    classifier = load_efficientnet_lite().get_submodule("net._fc")
    with torch.inference_mode():
        top1 = [classifier(torch.from_numpy(f)).argmax(dim=1).numpy() for f in (ref, fast)]
    return {
        "images": len(cos),
        "cos_min": float(cos.min()),
        "cos_p1": float(np.percentile(cos, 1)),
        "cos_median": float(np.median(cos)),
        "max_abs_diff": float(np.abs(ref - fast).max()),
        "top1_agreement": float((top1[0] == top1[1]).mean()),
    }


def latency(backbones: dict[str, Backbone], blobs: list[bytes], *, block: int) -> dict[str, float]:
    """p50 / p90 ms of one image at a time, the paths alternating every `block` images.

    Not image by image: the reference's OpenMP threads, still spinning after its call, would
    slow the fast path's next image down about 2x.
    """
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for i, start in enumerate(range(0, len(blobs), block)):
        for name in ordered(i):
            times[name] += [
                timed(encode_bytes, backbones[name], b) for b in blobs[start : start + block]
            ]
    return {
        f"{k}_{name}": ms(v, q) for name, v in times.items() for k, q in (("p50", 50), ("p90", 90))
    }


def batcher(
    backbones: dict[str, Backbone], blobs: list[bytes], windows: list[float]
) -> dict[str, float]:
    cases = [("reference", 5.0)] + [("fast", w) for w in windows]
    out = {}
    for name, window in cases:
        bb = backbones[name]
        mb = MicroBatcher(bb, window_ms=window, max_batch=32)
        try:
            through_batcher(mb, blobs[0])  # warm
            times = [timed(through_batcher, mb, blob) for blob in blobs]
        finally:
            mb.close()
        out[f"{name}_{window:g}ms"] = ms(times)
    return out


def per_image(fn: Callable[[], object], n: int) -> float:
    return timed(fn) / n * 1e3


def breakdown(backbones: dict[str, Backbone], blobs: list[bytes]) -> dict[str, float]:
    ref, fast = backbones["reference"], backbones["fast"]
    n = len(blobs)
    out = {
        "decode": per_image(lambda: [decode(b, draft=False) for b in blobs], n),
        "decode_draft": per_image(lambda: [decode(b, draft=True) for b in blobs], n),
    }
    images = [decode(b, draft=False) for b in blobs]
    out["resize_crop"] = per_image(lambda: [crop_pixels(im) for im in images], n)
    crops = [Image.fromarray(crop_pixels(im)) for im in images]
    steps = ref.preprocess.transforms[2:]  # ToTensor, Normalize
    out["to_tensor_reference"] = per_image(lambda: [steps[1](steps[0](c)) for c in crops], n)
    pixels = np.stack([np.asarray(c) for c in crops])
    out["to_tensor_fast"] = per_image(lambda: pixels_to_input(fast, pixels), n)
    x = pixels_to_input(fast, pixels[:32])
    package = ref.net.get_submodule("net")  # the package's EfficientNet inside the reference
    builders: list[tuple[str, Callable[[], torch.nn.Module], int]] = [
        ("net_reference_t1", lambda: ref.net, 1),
        ("net_reference_t2", lambda: ref.net, 2),
        ("net_fused_t1", lambda: fuse_lite(package), 1),
        ("net_packed_t1", lambda: pack_for_cpu(fuse_lite(package)), 1),
        ("net_packed_t2", lambda: pack_for_cpu(fuse_lite(package)), 2),
    ]
    threads = torch.get_num_threads()
    with torch.inference_mode():
        for key, build, t in builders:
            torch.set_num_threads(t)
            net = build()  # packed under the thread count it runs with, as load_backbone does
            for batch in (1, len(x)):
                xb = x[:batch]
                net(xb)  # warm
                reps = max(1, 8 // batch) * 3
                runs = [timed(net, xb) / batch * 1e3 for _ in range(reps)]
                out[f"{key}_b{batch}"] = statistics.median(runs)
    torch.set_num_threads(threads)
    return out


def machine() -> dict[str, Any]:
    return {
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("../shared/data/web-news"))
    p.add_argument("--n", type=int, default=0, help="images for throughput (0: all)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--block", type=int, default=50, help="images per block of one path (/5: latency)"
    )
    p.add_argument("--latency-images", type=int, default=50)
    p.add_argument("--breakdown-images", type=int, default=64)
    p.add_argument("--windows", default="0,1,5", help="batcher windows in ms, comma-separated")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    data = load_dataset("web-news", args.root)
    assert data.image_paths is not None
    paths = list(data.image_paths[: args.n or None])
    step = max(1, len(data.image_paths) // args.latency_images)
    blobs = [q.read_bytes() for q in data.image_paths[::step][: args.latency_images]]
    step = max(1, len(data.image_paths) // args.breakdown_images)
    few = [q.read_bytes() for q in data.image_paths[1::step][: args.breakdown_images]]
    cpu = torch.device("cpu")
    backbones = {
        "reference": load_backbone("efficientnet-lite0", device=cpu, fast=False),
        "fast": load_backbone("efficientnet-lite0", device=cpu),
    }
    for bb in backbones.values():
        encode_images(bb, paths[:8])  # warm
    windows = [float(w) for w in args.windows.split(",")]
    samples = []
    report_tolerance: dict[str, float] = {}
    for run in range(args.runs):
        row: dict[str, Any] = {"run": run, "load_average": os.getloadavg()[0]}
        rates, feats = throughput(backbones, paths, block=args.block)
        row |= rates
        if run == 0:
            report_tolerance = tolerance(feats)
            print(json.dumps({"tolerance": report_tolerance}), flush=True)
        row |= latency(backbones, blobs, block=max(1, args.block // 5))
        row["batcher"] = batcher(backbones, blobs, windows)
        row["breakdown"] = breakdown(backbones, few)
        samples.append(row)
        print(json.dumps(row), flush=True)

    def med(key: str) -> float:
        return float(statistics.median(s[key] for s in samples))

    report: dict[str, Any] = {"machine": machine(), "n": len(paths), "runs": args.runs}
    report["tolerance"] = report_tolerance
    for name in PATHS:
        report[name] = {
            "images_per_s": med(f"images_per_s_{name}"),
            "cpu_ms_per_image": med(f"cpu_ms_per_image_{name}"),
            "latency_p50_ms": med(f"p50_{name}"),
            "latency_p90_ms": med(f"p90_{name}"),
        }
    ref, fast = report["reference"], report["fast"]
    report["ratio"] = {
        "images_per_s": fast["images_per_s"] / ref["images_per_s"],
        "cpu_ms_per_image": ref["cpu_ms_per_image"] / fast["cpu_ms_per_image"],
        "latency_p50_ms": ref["latency_p50_ms"] / fast["latency_p50_ms"],
        "latency_p90_ms": ref["latency_p90_ms"] / fast["latency_p90_ms"],
    }
    for part in ("batcher", "breakdown"):
        keys = samples[0][part]
        report[part] = {k: statistics.median(s[part][k] for s in samples) for k in keys}
    report["samples"] = samples
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
