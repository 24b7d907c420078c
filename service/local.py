"""Run the service as a user does, `python -m service serve`, in a child process on loopback.

For the tests that need a real HTTP server and for scripts/bench_service.py: one way to start,
wait for readiness and stop. The child's output goes to a temporary file, not a pipe, so a busy
server never blocks on a full pipe; it is quoted when the server fails to come up.
"""

from __future__ import annotations

import os
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
    command = [sys.executable, "-m", "service", "serve", "--artifacts", str(artifacts), *args]
    with serving_command(command, ready_timeout_s=ready_timeout_s, env=env) as url:
        yield url


@contextmanager
def serving_command(
    command: list[str], *, ready_timeout_s: float, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run `command --port P` on a free loopback port until /readyz answers 200; yield its URL.

    The service of `serving`, and any other app that takes --port and answers /readyz (the
    benchmark's floor app).
    """
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
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
