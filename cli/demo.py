"""`cmh demo generate` and `cmh demo build`: the embedded demo dataset and its artifacts."""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.demo_artifacts import build_demo
from models.data.demo import N_DEFAULT, generate_demo


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
        help="build what is missing of the demo artifacts (dataset, features, model, index)",
        description="Generate the demo dataset into ARTIFACTS/demo, extract its features (cached "
        "in ARTIFACTS/features), train an AUCMH checkpoint and index every scene, each step "
        "only if its output is missing; says what it built.",
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
    for line in build_demo(args.artifacts, progress=True):
        print(line)
    return 0
