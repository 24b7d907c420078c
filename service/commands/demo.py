"""`cmh demo generate` and `cmh demo build`: the embedded demo dataset and its artifacts."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from models.demo import N_DEFAULT, generate_demo
from models.pipeline import prepare


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `demo generate` and `demo build`."""
    demo = subparsers.add_parser(
        "demo", help="the embedded demo dataset", description="The embedded demo dataset."
    )
    sub = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    gen = sub.add_parser(
        "generate",
        help="render the demo scenes, captions and labels",
        description="Render picture-book scenes with English captions and multi-hot labels.",
    )
    gen.add_argument("--out", type=Path, default=Path("artifacts/demo"), help="output folder")
    gen.add_argument("--n", type=int, default=N_DEFAULT, help="number of scenes")
    gen.add_argument("--seed", type=int, default=0, help="random seed")
    gen.set_defaults(run=run_generate)
    build = sub.add_parser(
        "build",
        help="build what is missing of the demo artifacts (dataset, features, ...)",
        description="Generate the demo dataset into ARTIFACTS/demo if missing and extract its "
        "features (cached in ARTIFACTS/features); says what it built.",
    )
    build.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts folder")
    build.set_defaults(run=run_build)


def run_generate(args: argparse.Namespace) -> int:
    """Generate the demo and say where it is."""
    root = generate_demo(args.out, n=args.n, seed=args.seed, progress=True)
    print(f"demo dataset: {args.n} scenes in {root}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    """Build the missing demo artifacts and report each step."""
    root = args.artifacts / "demo"
    if (root / "captions.jsonl").is_file():
        print(f"demo dataset: present in {root}")
    else:
        start = time.perf_counter()
        generate_demo(root, progress=True)
        seconds = time.perf_counter() - start
        print(f"demo dataset: generated {N_DEFAULT} scenes in {root} ({seconds:.0f} s)")
    start = time.perf_counter()
    data = prepare("demo", root, cache_dir=args.artifacts / "features", progress=True)
    assert data.image_features is not None and data.text_features is not None
    print(
        f"features: image {data.image_features.shape} ({data.image_backbone}), text "
        f"{data.text_features.shape} (bag of words) in {time.perf_counter() - start:.0f} s"
    )
    return 0
