"""Run the service as a user does, `python -m cli serve`, in a child process on loopback.

For the tests that need a real HTTP server and for the HTTP benchmarks: one way to start, wait
for readiness and stop, and the synthetic artifacts the benchmarks serve. The child's output
goes to a temporary file, not a pipe, so a busy server never blocks on a full pipe; it is quoted
when the server fails to come up.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.writes import synthetic_items
from models.network.checkpoint import load_checkpoint
from store.compaction import compact_once
from store.layout import CHECKPOINT_NAME
from store.manifest import manifest_for
from store.store import Store

BUILD_BATCH = 100_000  # items per store.add while building synthetic artifacts
logger = logging.getLogger(__name__)

OUTPUT_TAIL = 4000  # characters of the child's output quoted when it fails to start


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def serving(
    artifacts: Path, *, args: Sequence[str] = (), ready_timeout_s: float = 120.0, **env: str
) -> Iterator[str]:
    """Serve `artifacts` (more `cmh serve` options in `args`, CMH_* settings in `env`) until the
    block ends; yields the URL.

    Raises RuntimeError, quoting the child's output, when it exits or is not ready in time.
    The block's end sends SIGTERM (a clean uvicorn shutdown), then kills after 30 s.
    """
    with service_process(artifacts, args=args, ready_timeout_s=ready_timeout_s, **env) as (_, url):
        yield url


@contextmanager
def service_process(
    artifacts: Path, *, args: Sequence[str] = (), ready_timeout_s: float = 120.0, **env: str
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`serving`, yielding the server's process too (for tests that kill it)."""
    command = [sys.executable, "-m", "cli", "serve", "--artifacts", str(artifacts), *args]
    with running(command, ready_timeout_s=ready_timeout_s, env=env) as (proc, url):
        yield proc, url


@contextmanager
def serving_command(
    command: list[str], *, ready_timeout_s: float, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run `command --port P` on a free loopback port until /readyz answers 200; yield its URL.

    The service of `serving`, and any other app that takes --port and answers /readyz (the
    benchmark's floor app).
    """
    with running(command, ready_timeout_s=ready_timeout_s, env=env) as (_, url):
        yield url


@contextmanager
def running(
    command: list[str], *, ready_timeout_s: float, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`serving_command`, yielding the process too; a process killed in the block is fine."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as output:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            env={**os.environ, **(env or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + ready_timeout_s
            while not _ready(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    output.seek(0)
                    raise RuntimeError(
                        f"expected the service on {url} ready within {ready_timeout_s:g} s, got "
                        f"exit code {proc.poll()}; its output:\n{output.read()[-OUTPUT_TAIL:]}"
                    )
                time.sleep(0.2)
            yield proc, url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def synthetic_artifacts(checkpoint: Path, target: Path, *, n: int, seed: int = 0) -> None:
    """target/model.pt (a copy of checkpoint) and a store of n synthetic items for it (random
    codes, demo-like captions, image paths that name no file), compacted into one segment, as a
    long-running server ends up with: what the HTTP benchmarks serve."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint, target / CHECKPOINT_NAME)
    loaded = load_checkpoint(target / CHECKPOINT_NAME)
    manifest = manifest_for(
        target / CHECKPOINT_NAME,
        n_bits=loaded.n_bits,
        backbone=loaded.image_backbone,
        vocabulary=loaded.vocabulary or [],
    )
    rng = np.random.default_rng(seed)
    store = Store.create(target, manifest)
    try:
        for first in range(0, n, BUILD_BATCH):
            store.add(synthetic_items(rng, first, min(BUILD_BATCH, n - first), loaded.n_bits))
            logger.info("built %d / %d items", min(first + BUILD_BATCH, n), n)
        compact_once(store, force=True)
    finally:
        store.close()
