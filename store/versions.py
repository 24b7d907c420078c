"""Versions of an artifacts folder: each a model and the store its codes were made with.

A retrained model means every code changes, so a new model is served from a new store built beside
the live one (`cmh index reindex`), and the server switches to it in one step (POST
/v1/admin/reload), as vector databases switch an alias from one collection to the next. Layout:

    artifacts/model.pt, store/, images/    version v1: the folder as `cmh train` and `cmh index
                                           build` made it (older folders are v1 as they are)
    artifacts/versions/v2/model.pt, store/, images/, reindex.json    version v2, and so on
    artifacts/CURRENT                      the name of the served version (absent: v1)

Each version's folder is laid out as an artifacts folder, so a store opens in it as anywhere
else. Its images are hard links to the same files of the version it was built from (same name,
the SHA-256 of the bytes: no second copy on disk), so removing one version never takes an image
from another. CURRENT is replaced atomically (a rename), so a crash leaves the old name or the
new one. The job records and the feature cache stay at the top of the folder, shared by all.

A version's reindex.json names its backend: "local" (its own store/ folder) or "milvus" (a
collection per version, store/milvus_versions.py, where the Milvus pointer plays CURRENT's
part); v1 belongs to both. A switch only goes to a version of the backend served.

A version other than v1 is complete once its reindex has copied every item of its source:
`reindex.json` then says "ready". A switch only goes to a ready version; a rollback goes to the
ready version before the served one. Old versions stay until `cmh index prune` removes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConflictError, InputError
from common.fsio import atomic_write_bytes
from store.layout import CHECKPOINT_NAME
from store.locks import LOCK_NAME, try_exclusive
from store.store import STORE_DIR

VERSIONS_DIR = "versions"
CURRENT_NAME = "CURRENT"
STATE_NAME = "reindex.json"  # a built version's record: its source, model digest and state
FIRST = "v1"  # the version at the top of the artifacts folder
_NAME = re.compile(r"v([1-9][0-9]{0,8})")
LOCAL, MILVUS = "local", "milvus"  # a version's backend (reindex.json "backend")


def backend_of(milvus: bool) -> str:
    """The backend name of a served store."""
    return MILVUS if milvus else LOCAL


@dataclass(frozen=True)
class Version:
    """One version of an artifacts folder."""

    name: str  # "v1", "v2", ...
    path: Path  # its folder (the artifacts folder itself for v1)
    current: bool  # whether CURRENT names it
    state: str  # "ready", "building" (a reindex not finished), "empty" (no model yet)
    source: str | None  # the version it was reindexed from (None for v1)
    disk_bytes: int  # its model and store files (images are shared hard links: not counted)
    backend: str | None = None  # LOCAL or MILVUS; None for v1, which belongs to both

    def serves_on(self, backend: str | None) -> bool:
        """Whether this version can be served by `backend` (None: any)."""
        return backend is None or self.backend in (None, backend)

    @property
    def number(self) -> int:
        """Its number, the order versions were made in."""
        return version_number(self.name)


def version_number(name: str) -> int:
    """The number of a version name; InputError for anything but v1, v2, ..."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise InputError(f"expected a version name like v2, got {name!r}")
    return int(match.group(1))


def version_dir(artifacts: Path, name: str) -> Path:
    """The folder of version `name` (the artifacts folder itself for v1)."""
    return artifacts if version_number(name) == 1 else artifacts / VERSIONS_DIR / name


def current_name(artifacts: Path) -> str:
    """The name of the served version (v1 without a CURRENT file)."""
    path = artifacts / CURRENT_NAME
    try:
        name = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return FIRST
    version_number(name)
    return name


def serving_dir(artifacts: Path) -> Path:
    """The folder of the served version: where its model.pt and store/ are."""
    return version_dir(artifacts, current_name(artifacts))


def set_current(artifacts: Path, name: str) -> None:
    """Make `name` the served version, atomically and durably."""
    version_number(name)
    atomic_write_bytes(artifacts / CURRENT_NAME, f"{name}\n".encode())


def read_state(path: Path) -> dict[str, Any]:
    """A version folder's reindex record ({} where there is none: v1)."""
    try:
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise InputError(f"expected a JSON record at {path / STATE_NAME}, got: {err}") from None
    if not isinstance(state, dict):
        raise InputError(f"expected a JSON object at {path / STATE_NAME}, got {state!r}")
    return state


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace a version folder's reindex record atomically."""
    atomic_write_bytes(path / STATE_NAME, json.dumps(state, indent=1).encode())


def disk_bytes(path: Path) -> int:
    """Bytes of a version's model and store files (what removing it frees, besides images that
    no other version links)."""
    total = 0
    model = path / CHECKPOINT_NAME
    if model.is_file():
        total += model.stat().st_size
    for root, _, files in os.walk(path / STORE_DIR):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except FileNotFoundError:  # a temporary file renamed meanwhile
                continue
    return total


def versions(artifacts: Path, *, current: str | None = None) -> list[Version]:
    """Every version of the folder, oldest first; `current`: the served one's name where
    CURRENT does not say it (the Milvus pointer)."""
    current = current or current_name(artifacts)
    found: list[Version] = []
    names = [FIRST]
    folder = artifacts / VERSIONS_DIR
    if folder.is_dir():
        extra = [p.name for p in folder.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)]
        names += sorted(extra, key=version_number)
    for name in names:
        path = version_dir(artifacts, name)
        state = read_state(path)
        if name == FIRST:
            status = "ready" if (path / CHECKPOINT_NAME).is_file() else "empty"
        else:
            status = str(state.get("state", "building"))
        found.append(
            Version(
                name=name,
                path=path,
                current=name == current,
                state=status,
                source=state.get("source"),
                disk_bytes=disk_bytes(path),
                backend=None if name == FIRST else str(state.get("backend", LOCAL)),
            )
        )
    return found


def find(artifacts: Path, name: str, *, current: str | None = None) -> Version:
    """The version called `name`; InputError naming those there are."""
    version_number(name)
    every = versions(artifacts, current=current)
    for version in every:
        if version.name == name:
            return version
    there = ", ".join(v.name for v in every)
    raise ConflictError(f"expected one of the versions {there} of {artifacts}, got {name!r}")


def switch_target(
    artifacts: Path, name: str | None, *, current: str | None = None, backend: str | None = None
) -> Version:
    """The version a switch goes to: `name`, or the newest ready one after the served one (of
    `backend`); InputError when it is the served one, not ready, or there is none."""
    current = current or current_name(artifacts)
    if name is None:
        later = [
            v
            for v in versions(artifacts, current=current)
            if v.number > version_number(current) and v.state == "ready" and v.serves_on(backend)
        ]
        if not later:
            raise ConflictError(
                f"expected a ready version newer than the served {current} in {artifacts} "
                "(made by `cmh index reindex`), got none"
            )
        return later[-1]
    target = find(artifacts, name, current=current)
    if target.name == current:
        raise ConflictError(f"expected a version other than the served {current}, got {name}")
    if target.state != "ready":
        raise ConflictError(f"expected a ready version, got {name}, which is {target.state}")
    if not target.serves_on(backend):
        raise ConflictError(
            f"expected a version built for the {backend} backend, got {name}, built for "
            f"{target.backend}"
        )
    return target


def previous(artifacts: Path, *, current: str | None = None, backend: str | None = None) -> Version:
    """The ready version before the served one (what a rollback goes to); InputError if none."""
    served = version_number(current or current_name(artifacts))
    earlier = [
        v
        for v in versions(artifacts, current=f"v{served}")
        if v.number < served and v.state == "ready" and v.serves_on(backend)
    ]
    if not earlier:
        raise ConflictError(
            f"expected a ready version before the served v{served} to roll back to, got none"
        )
    return earlier[-1]


def next_name(artifacts: Path) -> str:
    """The name of a version made now: one past the highest there is."""
    return f"v{max(v.number for v in versions(artifacts)) + 1}"


def remove(
    artifacts: Path, name: str, *, current: str | None = None, keep_images: bool = False
) -> int:
    """Remove a version that is neither served nor open in a process; the bytes it held.

    Its store's flock is taken first: a server still answering a request on a version it has
    switched away from holds it, and the removal is refused until that ends. `keep_images`:
    v1's images/ stays (the Milvus backend: every version's items name those files).
    """
    version = find(artifacts, name, current=current)
    if version.current:
        raise InputError(f"expected a version that is not served, got {name}, the served one")
    lock = version.path / STORE_DIR / LOCK_NAME
    held = try_exclusive(lock) if lock.is_file() else None
    if lock.is_file() and held is None:
        raise InputError(f"expected version {name} to be free, but a process has its store open")
    try:
        freed = version.disk_bytes
        if version.number == 1:  # the top of the folder: its model, store and images alone
            (version.path / CHECKPOINT_NAME).unlink(missing_ok=True)
            for part in (STORE_DIR,) if keep_images else (STORE_DIR, "images"):
                shutil.rmtree(version.path / part, ignore_errors=True)
        else:
            shutil.rmtree(version.path)
    finally:
        if held is not None:
            held.close()
    return freed
