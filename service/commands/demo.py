"""`cmh demo generate`: render the embedded demo dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from models.demo import N_DEFAULT, generate_demo


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `demo generate`."""
    demo = subparsers.add_parser("demo", help="the embedded demo dataset", description="The demo.")
    sub = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    gen = sub.add_parser(
        "generate",
        help="render the demo scenes, captions and labels",
        description="Render picture-book scenes with English captions and multi-hot labels.",
    )
    gen.add_argument("--out", type=Path, default=Path("artifacts/demo"), help="output folder")
    gen.add_argument("--n", type=int, default=N_DEFAULT, help="number of scenes")
    gen.add_argument("--seed", type=int, default=0, help="random seed")
    gen.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Generate the demo and say where it is."""
    root = generate_demo(args.out, n=args.n, seed=args.seed, progress=True)
    print(f"demo dataset: {args.n} scenes in {root}")
    return 0
