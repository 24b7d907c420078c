"""A milvus-lite gRPC server in a child process: what the tests and `cmh bench writes --backend
milvus` run MilvusStore against when no Milvus server is given.

milvus-lite (a dev dependency, pinned) ships the Milvus server binary; `milvus_lite.server.Server`
only assembles its command line, which is run here as a child this process owns, so a caller can
kill -9 it, stop it (SIGSTOP: a hung server) and start it again on the same database file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

from common.errors import InputError

START_TIMEOUT_S = 30.0


class MilvusLite:
    """One milvus-lite server on a free loopback port, over the database file `db_file`."""

    def __init__(self, db_file: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # milvus-lite 2.5.1 imports pkg_resources
            try:
                from milvus_lite.server import Server  # noqa: PLC0415 (a dev dependency)
            except ImportError:
                raise InputError(
                    "expected milvus-lite to start a Milvus server: pip install milvus-lite==2.5.1"
                    " (a dev dependency), or pass the URI of a running Milvus"
                ) from None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        server = Server(str(db_file), address=f"127.0.0.1:{self.port}")
        self.args: list[str] = list(server.args)
        self.cwd = db_file.parent
        self.env = {**os.environ, "LD_LIBRARY_PATH": str(Path(server.milvus_bin).parent)}
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until its port accepts connections."""
        self.proc = subprocess.Popen(
            self.args, env=self.env, cwd=self.cwd, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-lite exited with {self.proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"milvus-lite did not listen within {START_TIMEOUT_S:g} s")

    def pause(self) -> None:
        """SIGSTOP the server: it holds its connections and answers nothing (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the server (no clean shutdown) and reap it."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None
