"""`cmh serve`: the HTTP service over an artifacts folder, with uvicorn."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import uvicorn

from common.errors import InputError
from service.app import create_served_app, load
from service.metrics import Metrics
from service.settings import Settings
from service.stores import served_version
from store import versions
from store.layout import CHECKPOINT_NAME

WORKER_HEALTHCHECK_S = 30  # seconds a worker may take to answer uvicorn's liveness ping


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `serve`."""
    p = subparsers.add_parser(
        "serve",
        help="serve the search API over an artifacts folder",
        description="Serve the search API (OpenAPI at /docs) over the checkpoint and indexes in "
        "an artifacts folder. Other settings come from CMH_* environment variables.",
    )
    p.add_argument(
        "--artifacts", type=Path, default=None, help="artifacts folder (CMH_ARTIFACTS_DIR)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes sharing the store's memory-mapped codes and its writes, or the "
        "Milvus collection (default 1)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check everything, then run uvicorn (in `--workers` processes) until interrupted."""
    settings = Settings() if args.artifacts is None else Settings(artifacts_dir=args.artifacts)
    if args.workers < 1:
        raise InputError(f"expected --workers of at least 1, got {args.workers}")
    checkpoint = versions.version_dir(settings.artifacts_dir, served_version(settings))
    checkpoint = checkpoint / CHECKPOINT_NAME
    if not checkpoint.is_file():  # say so in one line, before uvicorn's startup traceback would
        raise InputError(
            f"expected a checkpoint at {checkpoint} (build one with `cmh demo build --artifacts "
            f"{settings.artifacts_dir}` or `cmh train ... --out {checkpoint}`), got no file"
        )
    print(f"serving {settings.artifacts_dir} at http://{args.host}:{args.port}/ (API docs: /docs)")
    # httptools and uvloop (pinned): uvicorn's fast HTTP parser and event loop, named so that a
    # missing one is an error rather than a silent fallback to h11 and asyncio.
    options = {
        "host": args.host,
        "port": args.port,
        "log_level": settings.log_level.lower(),
        "http": "httptools",
        "loop": "uvloop",
        # Requests are logged at DEBUG (STYLE): uvicorn's access log is on only at that level.
        "access_log": settings.log_level.upper() == "DEBUG",
    }
    # Everything is checked (checkpoint, backbone, store and its manifest, job records) before
    # uvicorn starts: a refusal is then this command's one line and exit 2, not a traceback.
    if args.workers == 1:
        uvicorn.run(create_served_app(settings), **options)
        return 0
    # Several processes: each worker loads for itself (service.app.create_worker_app), so what
    # the check loaded is closed here first; the store is then opened shared by all of them.
    load(settings, Metrics()).close()
    # The workers are fresh interpreters that read their settings from CMH_* variables: the one
    # setting that came from the command line goes to them that way.
    os.environ["CMH_ARTIFACTS_DIR"] = str(settings.artifacts_dir)
    uvicorn.run(
        "service.app:create_worker_app",
        factory=True,
        workers=args.workers,
        # uvicorn replaces a worker that does not answer its supervisor's ping within this
        # time (default 5 s); the pinging thread needs the GIL, which a worker importing torch
        # and loading the model on a busy machine can hold for longer than that.
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
        **options,
    )
    return 0
