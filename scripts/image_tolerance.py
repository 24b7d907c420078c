"""How far the fast image path's features are from the reference path's, and what that does to codes.

    .venv/bin/python -m scripts.image_tolerance --root ../shared/data/web-news \
        --json docs/results/image-tolerance.json [--draft-images 200] [--epochs 30]

- `features`: every Web News photo through load_backbone("efficientnet-lite0") with fast=False
  (the reference) and fast=True: cosine min / 1st percentile / median, the largest absolute
  difference, and the agreement of the ImageNet top-1 class (the package's classifier).
- `codes`: an AUCMH model (64 bits, k 20, the Web News defaults otherwise) trained on the
  reference features, as existing checkpoints and stores were; then the codes of every photo from
  the fast features against those from the reference features: bits that differ, and photos whose
  code differs at all. This says whether a store built with the reference path stays valid.
- `draft`: no Web News photo is large enough to be draft-decoded (the short side must reach
  2 x DRAFT_MIN_SIDE), so --draft-images photos are upscaled 4x (Lanczos) and saved as JPEG
  quality 92; their features from a full decode are compared with those from a draft decode at
  min_side 512 (2x the resize) and DRAFT_MIN_SIDE, and, for scale, with those of the same photos
  saved again at quality 95 and decoded in full (a change of no consequence to a user).

Writes {"features": {...}, "codes": {...}, "draft": {"<case>": {...}}} to --json.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.data.loaders import load_dataset
from models.features.image import (
    DRAFT_MIN_SIDE,
    Backbone,
    draft_jpeg,
    encode_images,
    load_backbone,
    load_efficientnet_lite,
    to_rgb,
)
from models.features.pipeline import DEFAULT_VOCAB_SIZE, fit_text_features
from models.training.train import TrainConfig, train


def compare(ref: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Cosines and ImageNet top-1 agreement of two (n, 1280) feature sets."""
    cos = (ref * other).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(other, axis=1)
    classifier = load_efficientnet_lite().get_submodule("net._fc")
    with torch.inference_mode():
        top1 = [classifier(torch.from_numpy(f)).argmax(dim=1).numpy() for f in (ref, other)]
    return {
        "images": len(cos),
        "cos_min": float(cos.min()),
        "cos_p1": float(np.percentile(cos, 1)),
        "cos_median": float(np.median(cos)),
        "max_abs_diff": float(np.abs(ref - other).max()),
        "top1_agreement": float((top1[0] == top1[1]).mean()),
    }


def jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decoded(blob: bytes, min_side: int | None) -> Image.Image:
    with Image.open(io.BytesIO(blob)) as im:
        if min_side is not None:
            draft_jpeg(im, min_side)
        im.load()
        return to_rgb(im)


def features_of(fast: Backbone, blobs: list[bytes], min_side: int | None) -> np.ndarray:
    """Features of JPEG bytes decoded in full (None) or drafted to min_side, 32 at a time."""
    parts = [
        encode_images(fast, [decoded(b, min_side) for b in blobs[i : i + 32]])
        for i in range(0, len(blobs), 32)
    ]
    return np.concatenate(parts)


def drafted(blob: bytes, min_side: int) -> bool:
    """Whether draft_jpeg reduces this JPEG at min_side (from its header, nothing decoded)."""
    with Image.open(io.BytesIO(blob)) as im:
        size = im.size
        return draft_jpeg(im, min_side).size != size


def draft_study(fast: Backbone, paths: list[Path]) -> dict[str, dict[str, float]]:
    big, resaved = [], []
    for path in paths:
        with Image.open(path) as im:
            rgb = to_rgb(im)
        big.append(jpeg(rgb.resize((rgb.width * 4, rgb.height * 4), Image.Resampling.LANCZOS), 92))
        resaved.append(jpeg(decoded(big[-1], None), 95))
    full = features_of(fast, big, None)
    out = {"resaved_q95": compare(full, features_of(fast, resaved, None))}
    for side in (512, DRAFT_MIN_SIDE):
        out[f"draft_{side}"] = compare(full, features_of(fast, big, side)) | {
            "drafted": float(np.mean([drafted(b, side) for b in big]))
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("../shared/data/web-news"))
    p.add_argument("--draft-images", type=int, default=200)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    data = load_dataset("web-news", args.root)
    assert data.image_paths is not None
    cpu = torch.device("cpu")
    reference = load_backbone("efficientnet-lite0", device=cpu, fast=False)
    fast = load_backbone("efficientnet-lite0", device=cpu)
    ref_feats = encode_images(reference, data.image_paths, progress=True)
    fast_feats = encode_images(fast, data.image_paths, progress=True)
    report: dict[str, Any] = {"features": compare(ref_feats, fast_feats)}
    print(json.dumps(report), flush=True)

    text, vectorizer = fit_text_features(data, vocab_size=DEFAULT_VOCAB_SIZE)
    with_ref = data.with_features(
        image=ref_feats, text=text, image_backbone="efficientnet-lite0",
        vocabulary=vectorizer.vocabulary,
    )  # fmt: skip
    cfg = replace(TrainConfig(), n_bits=64, k=20, epochs=args.epochs, device="cpu")
    model, _ = train(cfg=cfg, data=with_ref)
    codes_ref, codes_fast = model.encode_image(ref_feats), model.encode_image(fast_feats)
    differ = codes_ref != codes_fast  # (n, n_bits) of +-1
    report["codes"] = {
        "n_bits": 64,
        "images": len(differ),
        "bits_differing": int(differ.sum()),
        "bit_agreement": float(1 - differ.mean()),
        "images_with_a_different_code": int(differ.any(axis=1).sum()),
    }
    print(json.dumps({"codes": report["codes"]}), flush=True)

    step = max(1, len(data.image_paths) // args.draft_images)
    report["draft"] = draft_study(fast, list(data.image_paths[::step][: args.draft_images]))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
