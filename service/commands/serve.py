"""`cmh serve`: the HTTP service over an artifacts folder, with uvicorn."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import uvicorn

from common.errors import InputError
from service.app import create_app, load
from service.settings import Settings
from store.layout import CHECKPOINT_NAME


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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Build the app and run uvicorn until interrupted."""
    settings = Settings() if args.artifacts is None else Settings(artifacts_dir=args.artifacts)
    checkpoint = settings.artifacts_dir / CHECKPOINT_NAME
    if not checkpoint.is_file():  # say so in one line, before uvicorn's startup traceback would
        raise InputError(
            f"expected a checkpoint at {checkpoint} (build one with `cmh demo build --artifacts "
            f"{settings.artifacts_dir}` or `cmh train ... --out {checkpoint}`), got no file"
        )
    app = create_app(settings)
    # Everything is checked (checkpoint, backbone, store and its manifest) before uvicorn starts:
    # a refusal is then this command's one line and exit 2, not a server traceback.
    app.state.loaded = load(settings, app.state.metrics)
    # What is loaded by now (torch, numba, the model: half a million objects) lives as long as
    # the process: keep it out of the cyclic collector, whose full passes over it stalled every
    # request for 0.5-0.7 s (the p99 of `cmh bench service` at 32 connections).
    gc.freeze()
    print(f"serving {settings.artifacts_dir} at http://{args.host}:{args.port}/ (API docs: /docs)")
    # httptools and uvloop (pinned): uvicorn's fast HTTP parser and event loop, named so that a
    # missing one is an error rather than a silent fallback to h11 and asyncio.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        http="httptools",
        loop="uvloop",
    )
    return 0
