"""`cmh features`: extract image features into the cache and fit the text vocabulary."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cli.dataset_args import add_dataset_args, check_weights
from common.errors import InputError
from models.data.loaders import load_dataset
from models.features.pipeline import (
    cached_image_features,
    fit_text_features,
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `features`."""
    p = subparsers.add_parser(
        "features",
        help="extract image features (cached) and text bag-of-words for a dataset",
        description="Extract image features into a cache keyed by dataset, backbone and content "
        "(later runs read the cache) and fit the text vocabulary on the training texts.",
    )
    add_dataset_args(p)
    p.add_argument("--vocab-out", type=Path, help="write the fitted vocabulary JSON here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Extract (or read cached) features and print what was done."""
    check_weights(args)
    data = load_dataset(args.dataset, args.root)
    if data.image_paths is None:
        raise InputError(
            f"expected a dataset of image files, {args.dataset} ships features already"
        )
    start = time.perf_counter()
    features, cache, hit = cached_image_features(
        data, backbone=args.backbone, weights=args.weights, cache_dir=args.cache_dir, progress=True
    )
    seconds = time.perf_counter() - start
    text, vectorizer = fit_text_features(data, vocab_size=args.vocab_size)
    if args.vocab_out:
        vectorizer.save(args.vocab_out)
    report = {
        "dataset": data.name,
        "backbone": args.backbone,
        "images": len(data),
        "image_dim": int(features.shape[1]),
        "cache": str(cache),
        "cache_hit": hit,
        "seconds": round(seconds, 2),
        "images_per_second": None if hit else round(len(data) / seconds, 1),
        "vocabulary": vectorizer.dim,
        "texts_without_known_word": int((text.sum(axis=1) == 0).sum()),
    }
    print(
        json.dumps(report, indent=2)
        if args.json
        else " ".join(f"{k}={v}" for k, v in report.items())
    )
    return 0
