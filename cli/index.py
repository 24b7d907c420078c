"""`cmh index build` and `cmh index migrate`: offline ingestion into an artifacts folder's store.

`index build` goes through the same code as the HTTP dataset build (service/indexing.py): the
dataset is streamed CHUNK pairs at a time (memory bounded whatever its size), each chunk is
committed durably, and ids already in the store are skipped, so an interrupted build resumes
where it stopped when run again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from models.data.loaders import DATASETS, load_dataset
from service.encoder import Encoder, load_served_model
from service.indexing import Indexer
from store import legacy
from store.layout import open_store


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `index build` and `index migrate`."""
    index = subparsers.add_parser(
        "index", help="build or migrate the store", description="The store of an artifacts folder."
    )
    sub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = sub.add_parser(
        "build",
        help="index a dataset's pairs with the served checkpoint (streaming, resumable)",
        description="Encode every pair of a dataset with ARTIFACTS/model.pt and add it to the "
        "store, CHUNK pairs at a time; pairs whose id is already indexed are skipped (or "
        "replaced with --on-conflict replace); prints what was added and skipped.",
    )
    build.add_argument("--artifacts", type=Path, required=True, help="artifacts folder")
    build.add_argument("--dataset", required=True, choices=DATASETS, help="dataset name")
    build.add_argument("--root", required=True, type=Path, help="the dataset's folder")
    build.add_argument(
        "--on-conflict",
        choices=("error", "replace"),
        default="error",
        help="an id already indexed: skip it (error, default) or replace the item",
    )
    build.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    build.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image")
    build.set_defaults(run=run_build)
    migrate = sub.add_parser(
        "migrate",
        help="move a generation-format index (index/CURRENT) into the store",
        description="Read the current generation of ARTIFACTS/index, check it, add its items "
        "to a new store in index order and rename index/ to index.migrated/.",
    )
    migrate.add_argument("--artifacts", type=Path, required=True, help="artifacts folder")
    migrate.set_defaults(run=run_migrate)


def run_build(args: argparse.Namespace) -> int:
    """Stream the dataset into the store and report."""
    model = load_served_model(args.artifacts, device=args.device)
    data = load_dataset(args.dataset, args.root)
    store = open_store(args.artifacts, expected=model.manifest)
    encoder = Encoder(model.checkpoint, model.backbone, window_ms=0, max_batch=1)
    start = time.perf_counter()
    try:
        indexer = Indexer(store=store, encoder=encoder, max_pixels=args.max_pixels)
        with tqdm(desc="indexing", unit="items") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            outcome = indexer.add_dataset(data, progress, on_conflict=args.on_conflict)
        seconds = time.perf_counter() - start
        print(
            f"indexed {outcome.added} of {len(data)} pairs of {data.name} in {seconds:.1f} s "
            f"({outcome.added / max(seconds, 1e-9):.1f} items/s); store {store.root}: "
            f"{len(store)} items; {len(outcome.skipped)} skipped"
        )
        for line in outcome.skipped:
            print(f"  skipped {line}")
    finally:
        encoder.close()
        store.close()
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    """Migrate and say what was done."""
    if not legacy.has_generations(args.artifacts):
        print(f"nothing to migrate: no {args.artifacts / legacy.LEGACY_DIR / 'CURRENT'}")
        return 0
    store, line = legacy.migrate(args.artifacts)
    store.close()
    print(line)
    return 0
