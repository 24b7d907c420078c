"""`cmh data check`: load a dataset and account for every listed pair."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.data.loaders import DATASETS, load_dataset, summarize


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `data check`."""
    data = subparsers.add_parser("data", help="inspect datasets", description="Inspect datasets.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = sub.add_parser(
        "check",
        help="load a dataset and report counts, rejections and splits",
        description="Load a dataset and report listed, loaded and rejected pairs (with reasons), "
        "split sizes and the number of labels.",
    )
    check.add_argument("--dataset", required=True, choices=DATASETS, help="dataset name")
    check.add_argument("--root", required=True, type=Path, help="the dataset's folder")
    check.add_argument("--seed", type=int, default=0, help="seed of random query splits")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the dataset report."""
    report = summarize(load_dataset(args.dataset, args.root, seed=args.seed))
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(
        f"{report['dataset']}: listed {report['listed']}, loaded {report['loaded']}, "
        f"rejected {report['rejected']}; splits {report['splits']}; labels {report['n_labels']}"
    )
    print(f"protocol: {report['protocol']}")
    for kind, items in (
        ("rejected", report["rejections"]),
        ("defect", report["defects_loaded_anyway"]),
    ):
        for item in items:  # type: ignore[attr-defined]
            print(f"  {kind}: {item['pair']}: {item['reason']}")
    return 0
