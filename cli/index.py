"""`cmh index build` and `cmh index migrate`: offline ingestion into an artifacts folder's store.

`index build` goes through the same code as the HTTP dataset build (service/indexing.py): the
dataset is streamed CHUNK pairs at a time (memory bounded whatever its size), each chunk is
committed durably, and ids already in the store are skipped, so an interrupted build resumes
where it stopped when run again.

`index migrate --to milvus` copies the local store into a Milvus collection (the system of record
of CMH_INDEX_BACKEND=milvus) in batches, in seq order (so ties keep their order), skipping ids
already there (an interrupted copy resumes), then checks the counts and a sample of searches.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cli import index_versions
from common.errors import InputError, IntegrityError
from models.data.loaders import DATASETS, load_dataset
from service.encoder import Encoder, load_served_model
from service.indexing import Indexer
from store import legacy, versions
from store import metadata as md
from store.layout import check_store_free, open_store
from store.milvus_store import MilvusStore
from store.rows import NewItems
from store.store import DB_NAME, Store
from store.view import Target

SAMPLE_QUERIES = 20  # stored codes searched on both stores after a migration to Milvus
SAMPLE_K = 10  # hits compared per sample query


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `index build`, `index migrate` and the version actions (cli/index_versions.py)."""
    index = subparsers.add_parser(
        "index",
        help="build, migrate, reindex or switch the store",
        description="The store of an artifacts folder, and its versions.",
    )
    sub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = sub.add_parser(
        "build",
        help="index a dataset's pairs with the served checkpoint (streaming, resumable)",
        description="Encode every pair of a dataset with ARTIFACTS/model.pt and add it to the "
        "store, CHUNK pairs at a time; pairs whose id is already indexed are skipped (or "
        "replaced with --on-conflict replace, or refused with --on-conflict error); prints what "
        "was added and skipped.",
    )
    build.add_argument("--artifacts", type=Path, required=True, help="artifacts folder")
    build.add_argument("--dataset", required=True, choices=DATASETS, help="dataset name")
    build.add_argument("--root", required=True, type=Path, help="the dataset's folder")
    build.add_argument(
        "--on-conflict",
        choices=("skip", "error", "replace"),
        default="skip",
        help="an id already indexed: skip it (the default: running a build again resumes it), "
        "error (refuse the dataset before anything is written) or replace the item: the words "
        "and meanings of the HTTP build's on_conflict",
    )
    build.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    build.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image")
    build.set_defaults(run=run_build)
    migrate = sub.add_parser(
        "migrate",
        help="move a generation-format index into the store, or the store into Milvus",
        description="Without --to (or --to store): read the current generation of "
        "ARTIFACTS/index, check it, add its items to a new store in index order and rename "
        "index/ to index.migrated/. With --to milvus: copy the store's items into a Milvus "
        "collection in batches (resumable: ids already there are skipped), then check counts "
        "and a sample of searches on both.",
    )
    migrate.add_argument("--artifacts", type=Path, required=True, help="artifacts folder")
    migrate.add_argument(
        "--to", choices=("store", "milvus"), default="store", help="where to (default store)"
    )
    migrate.add_argument("--uri", default=None, help="Milvus server URL (with --to milvus)")
    migrate.add_argument("--collection", default="cmh_items", help="Milvus collection")
    migrate.add_argument("--batch", type=int, default=1000, help="items per write (1..1000)")
    migrate.add_argument(
        "--timeout-s", type=float, default=10.0, help="longest wait for one Milvus call"
    )
    migrate.set_defaults(run=run_migrate)
    index_versions.add_actions(sub)


def run_build(args: argparse.Namespace) -> int:
    """Stream the dataset into the store and report."""
    folder = versions.serving_dir(args.artifacts)  # the served version's model and store
    check_store_free(folder)  # before the model and the dataset load, which take long
    model = load_served_model(folder, device=args.device)
    data = load_dataset(args.dataset, args.root)
    store = open_store(folder, expected=model.manifest)
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
    if args.to == "milvus":
        return run_to_milvus(args)
    if not legacy.has_generations(args.artifacts):
        print(f"nothing to migrate: no {args.artifacts / legacy.LEGACY_DIR / 'CURRENT'}")
        return 0
    store, line = legacy.migrate(args.artifacts)
    store.close()
    print(line)
    return 0


def run_to_milvus(args: argparse.Namespace) -> int:
    """Copy the local store into the collection, then verify; 0 when both agree."""
    if not args.uri:
        raise InputError("expected --uri with --to milvus, got none")
    if not 1 <= args.batch <= 1000:
        raise InputError(f"expected --batch in 1..1000, got {args.batch}")
    store = Store.open(args.artifacts)
    try:
        target = MilvusStore.open(
            args.artifacts,
            uri=args.uri,
            collection=args.collection,
            expected=store.manifest,
            timeout_s=args.timeout_s,
        )
    except BaseException:
        store.close()
        raise
    try:
        copied = copy_items(store, target, batch=args.batch)
        verify(store, target)
        print(
            f"migrated {store.root} into Milvus collection {args.collection} at {args.uri}: "
            f"{copied} items copied, {len(store) - copied} already there; counts and "
            f"{min(SAMPLE_QUERIES, len(store))} sample searches per target agree"
        )
    finally:
        target.close()
        store.close()
    return 0


def copy_items(store: Store, target: MilvusStore, *, batch: int) -> int:
    """Add the store's live items to target in seq order, batch at a time; how many were new."""
    seqs, image, text = store.live_rows()
    path = store.root / DB_NAME
    conn = md.connect(path)
    copied = 0
    try:
        with tqdm(desc="migrating", unit="items", total=seqs.size) as bar:
            for start in range(0, seqs.size, batch):
                part = [int(q) for q in seqs[start : start + batch]]
                found = md.rows_by_seq(conn, part, path)
                if len(found) != len(part):
                    raise IntegrityError(f"expected a metadata row for every live seq in {path}")
                items = [found[q] for q in part]
                present = target.existing([item.id for item in items])
                keep = [i for i, item in enumerate(items) if item.id not in present]
                if keep:
                    rows = start + np.asarray(keep)
                    target.add(
                        NewItems(
                            ids=[items[i].id for i in keep],
                            texts=[items[i].text for i in keep],
                            images=[items[i].image for i in keep],
                            image_codes=image[rows],
                            text_codes=text[rows],
                            fields=[items[i].fields for i in keep],
                        )
                    )
                copied += len(keep)
                bar.update(len(part))
    finally:
        conn.close()
    return copied


def verify(store: Store, target: MilvusStore) -> None:
    """IntegrityError unless both hold as many items and a sample of stored codes, searched on
    both, finds the same ids at the same distances in the same order."""
    n_local, n_milvus = len(store), len(target)
    if n_local != n_milvus:
        raise IntegrityError(
            f"expected {n_local} items in Milvus collection {target.collection} after the "
            f"migration, got {n_milvus} (it held other items, or writes ran meanwhile)"
        )
    seqs, image, text = store.live_rows()
    if seqs.size == 0:
        return
    pick = np.random.default_rng(0).choice(seqs.size, min(SAMPLE_QUERIES, seqs.size), False)
    k = min(SAMPLE_K, seqs.size)
    targets: tuple[tuple[Target, np.ndarray], ...] = (("image", text[pick]), ("text", image[pick]))
    for target_name, queries in targets:
        local = store.search(target_name, queries, k).hits
        remote = target.search(target_name, queries, k).hits
        for q, (a, b) in enumerate(zip(local, remote, strict=True)):
            if [(i.id, d) for i, d in a] != [(i.id, d) for i, d in b]:
                raise IntegrityError(
                    f"expected the same {target_name} hits from the store and Milvus for sample "
                    f"query {q}, got {[(i.id, d) for i, d in a]} and {[(i.id, d) for i, d in b]}"
                )
