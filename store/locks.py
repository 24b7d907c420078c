"""The store's file locks (flock) between processes, and what each one means.

Threads of one process are serialised by the Store's threading locks; these say which processes
may have the store at once, which one is writing and which one merges. flock is released by the
kernel when its process dies, so a crash never leaves a store locked.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from common.errors import InputError

LOCK_NAME = "LOCK"  # flock: exclusive for a store open in one process, shared by the workers
WRITE_LOCK_NAME = "WRITE_LOCK"  # shared opens: flock held by whichever process is writing
COMPACT_LOCK_NAME = "COMPACT_LOCK"  # shared opens: flock of the one process that merges


def hold_flock(path: Path, *, shared: bool) -> BinaryIO:
    """Hold path's flock, exclusive (one process has the store) or shared (workers of one
    server share it); the kernel frees it on exit. Refuses when the other kind is held."""
    f = path.open("ab")
    try:
        fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise InputError(
            f"expected the store {path.parent} to be free, but another process has it open "
            "(a running server or build); stop it, or build through the server's API"
        ) from None
    return f


def try_exclusive(path: Path) -> BinaryIO | None:
    """Path's exclusive flock, held until the file is closed, or None if another process has it."""
    f = path.open("ab")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


@contextmanager
def exclusive(f: BinaryIO) -> Iterator[None]:
    """Hold f's exclusive flock for the block, waiting for any other process's."""
    fd = f.fileno()
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
