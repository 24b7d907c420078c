"""`cmh bench index` and `cmh bench mih`: our Hamming indexes against FAISS, side by side;
`cmh bench writes`: the store's adds, deletes, startup, memory and searches under ingest;
`cmh bench service`: the served searches under wrk, against the framework's floor."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.index import bench_index, bench_mih, bench_scoring, clustered_codes, make_data
from bench.milvus_writes import bench_milvus_writes
from bench.service import bench_service, require_wrk
from bench.writes import bench_writes, check_sizes
from common.errors import InputError
from indexes.codes import pack_codes
from models.features.pipeline import prepare
from models.features.text import TextVectorizer
from models.network.checkpoint import load_checkpoint
from store.layout import CHECKPOINT_NAME
from store.store import Store

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add `bench index`, `bench mih`, `bench writes` and `bench service` to the command line."""
    bench = subparsers.add_parser(
        "bench", help="benchmark the Hamming indexes against FAISS, and the store"
    )
    kinds = bench.add_subparsers(dest="bench_kind", required=True, metavar="KIND")
    flat = kinds.add_parser(
        "index",
        help="exact flat search: ours vs faiss.IndexBinaryFlat (single query and batch)",
        description="Build random (or --clustered) codes, time our HammingIndex and "
        "faiss.IndexBinaryFlat side by side with the same threads, check recall against "
        "FAISS, and print and write the JSON result.",
    )
    _add_common(flat)
    flat.add_argument("--clustered", action="store_true", help="codes from n/1000 centres")
    flat.set_defaults(run=run_index)
    mih = kinds.add_parser(
        "mih",
        help="multi-index hashing vs flat search and faiss.IndexBinaryMultiHash",
        description="Time MultiIndexHamming, HammingIndex, faiss.IndexBinaryFlat and "
        "faiss.IndexBinaryMultiHash on the same codes: generated (uniform or --clustered) or "
        "learned (--store: the image codes of an artifacts folder's store; --queries of them "
        "are held out as queries).",
    )
    _add_common(mih)
    source = mih.add_mutually_exclusive_group()
    source.add_argument("--clustered", action="store_true", help="codes from n/1000 centres")
    source.add_argument(
        "--store",
        type=Path,
        metavar="ARTIFACTS",
        help="an artifacts folder whose store's image codes (learned codes) to use instead",
    )
    mih.set_defaults(run=run_mih)
    scoring = kinds.add_parser(
        "scoring",
        help="single-query search time of asymmetric against Hamming scoring, on learned codes",
        description="Encode a dataset's database images with a trained checkpoint, spread "
        "them to N codes (each a random one of them with bits flipped at --flip), and time "
        "one-query searches of its query captions by Hamming distance and by asymmetric "
        "scoring (the captions' real hash-layer outputs) side by side on the same index "
        "(keys documented in bench/index.py bench_scoring).",
    )
    scoring.add_argument("--checkpoint", type=Path, required=True, help="a trained model.pt")
    scoring.add_argument("--dataset", required=True, help="the dataset it was trained on")
    scoring.add_argument("--root", type=Path, required=True, help="the dataset's folder")
    scoring.add_argument("--cache-dir", type=Path, default=Path(".cache/features"))
    scoring.add_argument("--n", type=int, default=1_000_000, help="database size (default 1M)")
    scoring.add_argument("--flip", type=float, default=0.05, help="bits flipped (default .05)")
    scoring.add_argument("--queries", type=int, default=200, help="query captions (default 200)")
    scoring.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    scoring.add_argument("--runs", type=int, default=5, help="passes over the queries")
    scoring.add_argument("--threads", type=int, help="search threads (default: every core)")
    scoring.add_argument("--json", type=Path, required=True, help="where to write the result")
    scoring.set_defaults(run=run_scoring)
    writes = kinds.add_parser(
        "writes",
        help="the store: bulk ingest, add/delete latency, startup, RSS, search during ingest",
        description="Build an N-item store of synthetic items (seeded random codes, demo-like "
        "captions) in a temporary folder, time its writes, startup (fresh processes), memory, "
        "disk and searches idle and during ingest, and print and write the JSON result "
        "(keys documented in bench/writes.py). With --backend milvus: MilvusStore's writes, "
        "searches and cross-replica visibility against a Milvus server (--uri, or a milvus-lite "
        "server it starts; keys documented in bench/milvus_writes.py).",
    )
    writes.add_argument("--n", type=int, default=1_000_000, help="store size (default 1M)")
    writes.add_argument(
        "--backend", choices=("memory", "milvus"), default="memory", help="store backend"
    )
    writes.add_argument(
        "--uri", help="--backend milvus: a Milvus server (default: start milvus-lite)"
    )
    writes.add_argument("--bits", type=int, default=64, help="code length in bits (default 64)")
    writes.add_argument("--repeats", type=int, default=5, help="timed repetitions (default 5)")
    writes.add_argument(
        "--batch",
        type=int,
        help="items per add in the build (default 100,000; 10,000 with --backend milvus)",
    )
    writes.add_argument(
        "--queries",
        type=int,
        help="searches per latency figure (default 2000; 200 with --backend milvus)",
    )
    writes.add_argument("--json", type=Path, required=True, help="where to write the result")
    writes.add_argument(
        "--dir",
        type=Path,
        help="folder in which the benchmark's temporary folder is made (default: the system's "
        "temp folder); its disk is the one measured",
    )
    writes.add_argument("--keep", action="store_true", help="keep the temporary folder")
    writes.set_defaults(run=run_writes)
    service = kinds.add_parser(
        "service",
        help="text and image search under wrk: `cmh serve` against a no-work floor app",
        description="Build an N-item store of synthetic items next to a copy of a trained "
        "checkpoint, serve it with `cmh serve` and a floor app (same FastAPI, uvicorn and "
        "response shape, no work), drive both in turn with wrk at 1, 8 and 32 connections "
        "(text search) and image search at 1 and 8 with micro-batching on and off, and print "
        "and write the medians (keys documented in bench/service.py). Needs wrk.",
    )
    service.add_argument("--n", type=int, default=1_000_000, help="store size (default 1M)")
    service.add_argument("--runs", type=int, default=3, help="alternated runs (default 3)")
    service.add_argument(
        "--duration", type=float, default=10.0, help="seconds of each wrk run (default 10)"
    )
    service.add_argument("--json", type=Path, required=True, help="where to write the result")
    service.add_argument(
        "--artifacts",
        type=Path,
        default=Path("artifacts"),
        help="where the checkpoint (model.pt) comes from, e.g. the demo's (default artifacts)",
    )
    service.add_argument(
        "--image",
        type=Path,
        help="the photo image searches post (default: the first JPEG in ARTIFACTS/demo/images)",
    )
    service.add_argument("--no-image", action="store_true", help="skip the image searches")
    service.add_argument(
        "--scorings",
        action="store_true",
        help="also drive the server with hamming and asymmetric text searches in turn",
    )
    service.add_argument(
        "--workers", type=int, default=1, help="server processes of both apps (default 1)"
    )
    service.add_argument(
        "--dir", type=Path, help="folder in which the temporary store is made (default: system's)"
    )
    service.add_argument("--keep", action="store_true", help="keep the temporary folder")
    service.set_defaults(run=run_service)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=1_000_000, help="database size (default 1M)")
    parser.add_argument("--bits", type=int, default=64, help="code length in bits (default 64)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument("--queries", type=int, default=1000, help="batch size (default 1000)")
    parser.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (default 3)")
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")


def _emit(result: dict[str, Any], path: Path) -> None:
    text = json.dumps(result, indent=2)
    print(text)  # noqa: T201 (commands print their result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    logger.info("wrote %s", path)


def run_index(args: argparse.Namespace) -> int:
    """Run `cmh bench index`."""
    result = bench_index(
        n=args.n,
        n_bits=args.bits,
        k=args.k,
        queries=args.queries,
        threads=args.threads,
        clustered=args.clustered,
        repeats=args.repeats,
    )
    _emit(result, args.json)
    return 0


def run_mih(args: argparse.Namespace) -> int:
    """Run `cmh bench mih`."""
    rng = np.random.default_rng(0)
    if args.store is not None:
        store = Store.open(args.store)
        try:
            _, codes, _ = store.live_rows()
            n_bits = store.manifest.n_bits
        finally:
            store.close()
        if len(codes) <= args.queries:
            raise InputError(f"expected more than {args.queries} codes, got {len(codes)}")
        held_out = rng.permutation(len(codes))
        qs, db = codes[held_out[: args.queries]], codes[held_out[args.queries :]]
        source = f"image codes of {args.store}"
    else:
        n_bits = args.bits
        db, qs = make_data(
            rng, n=args.n, n_bits=n_bits, queries=args.queries, clustered=args.clustered
        )
        source = "clustered" if args.clustered else "uniform"
    result = bench_mih(
        db=np.ascontiguousarray(db),
        qs=np.ascontiguousarray(qs),
        n_bits=n_bits,
        k=args.k,
        threads=args.threads,
        repeats=args.repeats,
    )
    _emit({"codes": source} | result, args.json)
    return 0


def run_scoring(args: argparse.Namespace) -> int:
    """Run `cmh bench scoring`."""
    if args.n < 1 or args.queries < 1 or args.runs < 1 or not 0 <= args.flip <= 0.5:
        raise InputError(
            "expected n, queries and runs >= 1 and flip in 0..0.5, got "
            f"{args.n}, {args.queries}, {args.runs}, {args.flip}"
        )
    checkpoint = load_checkpoint(args.checkpoint)
    if checkpoint.vocabulary is None:
        raise InputError("expected a checkpoint trained on bag-of-words text, got LDA features")
    data = prepare(
        args.dataset, args.root, backbone=checkpoint.image_backbone, cache_dir=args.cache_dir
    )
    assert data.image_features is not None and data.texts is not None
    model = checkpoint.model
    centres = pack_codes(model.encode_image(data.image_features[data.database_idx]))
    vectorizer = TextVectorizer(
        checkpoint.vocabulary,
        weighting=checkpoint.text_weighting,
        idf=checkpoint.idf,
        tokens=checkpoint.text_tokens,
    )
    texts = [data.texts[i] for i in data.query_idx[: args.queries]]
    with torch.inference_mode():
        features = torch.as_tensor(vectorizer.transform(texts)[0])
        real = model.hash_text(features, binary=False).double().numpy()
    rng = np.random.default_rng(0)
    db = clustered_codes(rng, args.n, centres, flip=args.flip)
    result = bench_scoring(
        db,
        pack_codes(np.where(real > 0, 1, -1)),
        real,
        k=args.k,
        runs=args.runs,
        threads=args.threads,
    )
    source = {"checkpoint": str(args.checkpoint), "dataset": args.dataset, "flip": args.flip}
    _emit(source | result, args.json)
    return 0


def run_writes(args: argparse.Namespace) -> int:
    """Run `cmh bench writes`."""
    milvus = args.backend == "milvus"
    if args.uri is not None and not milvus:
        raise InputError(f"expected --uri with --backend milvus only, got --backend {args.backend}")
    batch = args.batch or (10_000 if milvus else 100_000)
    queries = args.queries or (200 if milvus else 2000)
    check_sizes(n=args.n, n_bits=args.bits, repeats=args.repeats, batch=batch, queries=queries)
    sizes = {"n": args.n, "n_bits": args.bits, "repeats": args.repeats}
    sizes |= {"batch": batch, "queries": queries}
    with _scratch(args, "cmh-bench-writes-") as root:
        logger.info("building the benchmark store in %s", root)
        if milvus:
            result = bench_milvus_writes(root=root, uri=args.uri, **sizes)
        else:
            result = bench_writes(root=root, **sizes)
    _emit(result, args.json)
    return 0


@contextmanager
def _scratch(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """A new temporary folder under --dir (made if missing), removed afterwards unless --keep."""
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=args.dir))
    try:
        yield root
    finally:
        if args.keep:
            logger.info("kept %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_service(args: argparse.Namespace) -> int:
    """Run `cmh bench service`."""
    require_wrk()  # before anything is built
    image = None
    if not args.no_image:
        image = args.image or next(
            iter(sorted((args.artifacts / "demo" / "images").glob("*.jpg"))), None
        )
        if image is None:
            raise InputError(
                f"expected --image or a JPEG in {args.artifacts / 'demo' / 'images'}, got none"
            )
    with _scratch(args, "cmh-bench-service-") as root:
        result = bench_service(
            checkpoint=args.artifacts / CHECKPOINT_NAME,
            root=root,
            n=args.n,
            runs=args.runs,
            seconds=args.duration,
            image=image,
            workers=args.workers,
            scorings=args.scorings,
        )
    _emit(result, args.json)
    return 0
