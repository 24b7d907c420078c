"""`cmh index reindex | switch | rollback | prune | versions`: the versions of an artifacts folder.

A retrained model is served from a new version built beside the served one (store/versions.py,
service/reindex.py): `reindex` builds it while a server keeps answering and writing; the running
server switches to it on POST /v1/admin/reload, or, with no server running, `switch` does;
`rollback` goes back to the version before; `prune` removes versions no longer served. With
CMH_INDEX_BACKEND=milvus (and CMH_MILVUS_URI, CMH_MILVUS_COLLECTION, as `cmh serve` reads them)
each acts on the Milvus collections of the versions (store/milvus_versions.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from common.errors import InputError
from models.features.content_cache import DEFAULT_MAX_BYTES, STORE_CACHE_DIR
from service.reindex import reindex, switch_offline
from service.settings import Settings
from service.stores import milvus_pointer, served_version
from service.sync import BATCH, Switched, SyncCounts
from store import versions
from store.locks import LOCK_NAME, try_exclusive
from store.store import STORE_DIR

MIB = 1 << 20


def add_actions(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the version actions to `cmh index`."""
    p = sub.add_parser(
        "reindex",
        help="build a new version of the store with another model, beside the served one",
        description="Copy every item of the served version into a new version (its own store "
        "under ARTIFACTS/versions/) with the codes of checkpoint MODEL (from `cmh train "
        "--from-store`): streaming, resumable (run it again after an interruption), while a "
        "server keeps answering and writing. Then switch with POST /v1/admin/reload on the "
        "running server, or `cmh index switch` when none runs.",
    )
    p.add_argument("--artifacts", type=Path, required=True, help="artifacts folder")
    p.add_argument("--model", type=Path, required=True, help="the new checkpoint")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p.add_argument(
        "--nice",
        type=int,
        default=10,
        help="lower this process's CPU priority by this much while it runs (default 10: the "
        "server's searches come first; 0 leaves it as it is)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=BATCH,
        help=f"items read, encoded and committed at a time (default {BATCH}: memory is bounded "
        "by one batch)",
    )
    p.add_argument(
        "--feature-cache-mib",
        type=int,
        default=DEFAULT_MAX_BYTES // MIB,
        help=f"most MiB of image features ARTIFACTS/{STORE_CACHE_DIR} keeps (shared with "
        "`cmh train --from-store`, whose features a reindex reads instead of running the "
        "backbone again)",
    )
    p.set_defaults(run=run_reindex)
    for name, what in (("switch", "switch to a version"), ("rollback", "go back one version")):
        p = sub.add_parser(
            name,
            help=f"{what} (through the running server with --url)",
            description=f"{what.capitalize()}: the writes made since are carried over (re-encoded "
            "with the other model), CURRENT names it, the old store takes no more writes. "
            "Without --url the folder must not be open in a server; with --url the running "
            "server does it (POST /v1/admin/reload, its X-API-Key from CMH_API_KEY).",
        )
        p.add_argument("--artifacts", type=Path, required=True, help="artifacts folder")
        if name == "switch":
            p.add_argument("--to", default=None, help="version name (default: the newest ready)")
        p.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
        p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
        p.set_defaults(run=run_switch)
    p = sub.add_parser(
        "prune",
        help="remove versions that are not served",
        description="Remove one version (--version) or every version but the served one "
        "(--all-old); one still open in a server (answering a request that began before a "
        "switch) is refused. Images are hard links: one another version holds stays.",
    )
    p.add_argument("--artifacts", type=Path, required=True, help="artifacts folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", default=None, help="the version to remove")
    which.add_argument("--all-old", action="store_true", help="every version but the served one")
    p.set_defaults(run=run_prune)
    p = sub.add_parser("versions", help="list the versions", description="List the versions.")
    p.add_argument("--artifacts", type=Path, required=True, help="artifacts folder")
    p.set_defaults(run=run_versions)


def run_reindex(args: argparse.Namespace) -> int:
    """Build (or resume) the new version and say how to switch to it."""
    if args.feature_cache_mib < 1:
        raise InputError(
            f"expected --feature-cache-mib of at least 1, got {args.feature_cache_mib}"
        )
    with tqdm(desc="reindexing", unit="items") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        made = reindex(
            args.artifacts,
            args.model,
            device=args.device,
            cache_bytes=args.feature_cache_mib * MIB,
            batch=args.batch,
            progress=progress,
            settings=_settings(args),
        )
    print(
        f"{'resumed and finished' if made.resumed else 'built'} version {made.version} of "
        f"{args.artifacts} from {made.source}: {made.items} items, {made.copied} encoded in "
        f"{made.seconds:.1f} s ({made.items_per_s:.0f} items/s), {made.passes} passes; "
        f"switch with POST /v1/admin/reload on the running server, or `cmh index switch "
        f"--artifacts {args.artifacts}`"
    )
    return 0


def run_switch(args: argparse.Namespace) -> int:
    """Switch (or roll back) here or through the server, and say what was done."""
    name = getattr(args, "to", None)
    settings = _settings(args)
    milvus = settings.index_backend == "milvus"
    if args.index_command == "rollback":
        served = served_version(settings)
        name = versions.previous(
            args.artifacts, current=served, backend=versions.backend_of(milvus)
        ).name
    if args.url is not None:
        switched = _through_server(args.url, name)
    else:
        if not milvus:  # replicas of the Milvus backend follow its pointer: no lock to check
            _check_not_served(args.artifacts)
        switched = switch_offline(args.artifacts, name, device=args.device, settings=settings)
    counts = switched.caught_up
    print(
        f"now serving {switched.version} of {args.artifacts} (was {switched.previous}); carried "
        f"over {counts.copied} written and {counts.deleted} deleted items; {switched.seconds:.2f} s"
    )
    return 0


def _check_not_served(artifacts: Path) -> None:
    """InputError (one line saying how to switch instead) when a server has the store open."""
    lock = versions.serving_dir(artifacts) / STORE_DIR / LOCK_NAME
    if not lock.is_file():
        return
    held = try_exclusive(lock)
    if held is None:
        raise InputError(
            f"expected {artifacts} not to be served, but a server has it open: switch through it "
            "with --url http://HOST:PORT (POST /v1/admin/reload)"
        )
    held.close()


def _through_server(url: str, name: str | None) -> Switched:
    """POST /v1/admin/reload on a running server; its answer as a Switched."""
    body = json.dumps({"version": name}).encode()
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/admin/reload",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "X-API-Key": os.environ.get("CMH_API_KEY", ""),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = json.loads(err.read() or b"{}").get("detail", err.reason)
        raise InputError(
            f"expected the server at {url} to switch, got {err.code}: {detail}"
        ) from None
    except (urllib.error.URLError, OSError) as err:
        raise InputError(f"expected a server at {url}, got: {err}") from None
    caught = answer["caught_up"]
    counts = SyncCounts(caught["copied"], caught["deleted"], caught["seconds"])
    return Switched(answer["version"], answer["previous"], counts, answer["seconds"])


def run_prune(args: argparse.Namespace) -> int:
    """Remove the versions asked for and say what was freed."""
    settings = _settings(args)
    served = served_version(settings)
    every = versions.versions(args.artifacts, current=served)
    names = [v.name for v in every if not v.current] if args.all_old else [args.version]
    if not names:
        print(f"nothing to remove: {args.artifacts} has only the served version")
    for name in names:
        milvus = settings.index_backend == "milvus"
        if milvus:
            _drop_milvus_version(settings, name, served)
        freed = versions.remove(args.artifacts, name, current=served, keep_images=milvus)
        print(
            f"removed version {name} of {args.artifacts}: {freed / MIB:.1f} MiB of model and store"
        )
    return 0


def run_versions(args: argparse.Namespace) -> int:
    """One line per version."""
    for v in versions.versions(args.artifacts, current=served_version(_settings(args))):
        made = versions.read_state(v.path).get("finished")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(made)) if made else ""
        print(
            f"{'*' if v.current else ' '} {v.name:<5} {v.state:<9} {v.disk_bytes / MIB:9.1f} MiB"
            f"  {'from ' + v.source if v.source else ''} {when}".rstrip()
        )
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    """The service's settings (CMH_* variables) for this artifacts folder: which backend."""
    return Settings(artifacts_dir=args.artifacts)


def _drop_milvus_version(settings: Settings, name: str, served: str) -> None:
    """Drop a Milvus version's collection (never the served one's, nor one a switch is under
    way to)."""
    version = versions.find(settings.artifacts_dir, name, current=served)
    if version.current:
        raise InputError(f"expected a version that is not served, got {name}, the served one")
    if version.backend == versions.LOCAL:
        return
    pointer = milvus_pointer(settings)
    try:
        fence = pointer.read().fence
        if fence == name:
            raise InputError(f"expected no switch to {name} under way, got one")
        pointer.drop_version(name)
    finally:
        pointer.close()
