"""Versions on the Milvus backend (store/milvus_versions.py): a reindex into a new collection
while two `cmh serve` replicas keep answering and writing over HTTP, the switch through one of
them (the other follows the pointer), and a rollback, over one real milvus-lite server; a reindex
killed (SIGKILL) at seeded moments and resumed."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pymilvus import MilvusClient

from bench.local import serving
from cli.main import main
from store.milvus_lite import MilvusLite
from store.milvus_store import MilvusStore, id_of
from store.milvus_versions import LEASE_S, MilvusPointer, Pointer
from tests.test_train_from_store import FAST, write_pairs
from tests.test_versions import items_of, retrained_master
from tests.test_versions_live import FRESH, KEY, Traffic, reindex_command

__all__ = ["retrained_master"]  # the module fixture, shared with tests/test_versions.py
COLLECTION = "cmh_versioned"


def milvus_env(server: MilvusLite) -> dict[str, str]:
    return {
        "CMH_INDEX_BACKEND": "milvus",
        "CMH_MILVUS_URI": server.uri,
        "CMH_MILVUS_COLLECTION": COLLECTION,
        "CMH_MILVUS_TIMEOUT_S": "10",
        "CMH_API_KEY": "k",
    }


def migrated(master: Path, tmp_path: Path, server: MilvusLite) -> Path:
    """A private copy of the served folder whose store was migrated into COLLECTION (v1)."""
    artifacts = Path(shutil.copytree(master / "artifacts", tmp_path / "artifacts"))
    migrate = ["index", "migrate", "--artifacts", str(artifacts), "--to", "milvus"]
    assert main([*migrate, "--uri", server.uri, "--collection", COLLECTION]) == 0
    return artifacts


def collection_items(
    server: MilvusLite, artifacts: Path, name: str
) -> dict[object, tuple[str, dict[str, object]]]:
    """Every item of a Milvus collection: id -> (text, fields)."""
    store = MilvusStore.open(artifacts, uri=server.uri, collection=name, expected=None)
    try:
        keys = [key for page in store.keys_and_seqs() for key, _ in page]
        rows = store.rows_by_key(keys)
        return {id_of(k): (item.text, item.fields) for k, (_, item) in rows.items()}
    finally:
        store.close()


def test_reindex_and_switch_over_milvus_with_two_replicas_under_live_traffic(
    retrained_master: Path,
    tmp_path: Path,
    milvus_lite: MilvusLite,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    artifacts = migrated(retrained_master, tmp_path, milvus_lite)
    model = retrained_master / "new.pt"
    env = milvus_env(milvus_lite)
    base = {k: (t, f) for k, (t, _, _, f) in items_of(artifacts).items()}
    # Two replicas (processes) sharing the artifacts folder and the collection, as two hosts
    # with a shared volume would.
    with (
        serving(artifacts, ready_timeout_s=300, **env) as url_a,
        serving(artifacts, ready_timeout_s=300, **env) as url_b,
    ):
        with (
            Traffic(url_a, seed=1, prefix="a") as on_a,
            Traffic(url_b, seed=2, prefix="b") as on_b,
            httpx.Client(base_url=url_a, timeout=120) as a,
        ):
            time.sleep(1.0)
            built = subprocess.run(
                reindex_command(artifacts, model),
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, **env},
            )
            assert built.returncode == 0, built.stderr[-2000:]
            assert "built version v2" in built.stdout
            time.sleep(1.0)  # writes after the reindex: the switch carries them over
            switched = a.post("/v1/admin/reload", headers=KEY)
            assert switched.status_code == 200, switched.text
            assert switched.json()["version"] == "v2"
            # Acknowledged: the other replica answers with the new model from now on.
            with httpx.Client(base_url=url_b, timeout=120, limits=FRESH) as b:
                for _ in range(5):
                    body = b.post("/v1/search/text", json={"text": "crimson"}).json()
                    assert not body["no_known_words"], body
                assert b.get("/v1/index/stats").json()["version"] == "v2"
            time.sleep(1.5)
        for traffic in (on_a, on_b):
            assert traffic.failures == [], traffic.failures[:5]
            assert traffic.requests > 10 and len(traffic.added) >= 1
        # Every acknowledged write (through either replica) is in v2's collection, exactly.
        expected = dict(base)
        for traffic in (on_a, on_b):
            expected.update({k: v for k, v in traffic.added.items() if k not in traffic.deleted})
        assert collection_items(milvus_lite, artifacts, f"{COLLECTION}_v2") == expected
        # Roll back through replica B, in one command; A follows.
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        assert main(["index", "versions", "--artifacts", str(artifacts)]) == 0
        assert "* v2" in capsys.readouterr().out
        assert main(["index", "rollback", "--artifacts", str(artifacts), "--url", url_b]) == 0
        assert "now serving v1" in capsys.readouterr().out
        with httpx.Client(base_url=url_a, timeout=120) as a:
            assert a.get("/v1/index/stats").json()["version"] == "v1"
            known = a.post("/v1/search/text", json={"text": "crimson"}).json()
            assert known["no_known_words"]  # v1's model again
    assert collection_items(milvus_lite, artifacts, COLLECTION) == expected
    # Offline (no replica running): switch again; the pointer names v2.
    assert main(["index", "switch", "--artifacts", str(artifacts)]) == 0
    pointer = MilvusPointer(milvus_lite.uri, COLLECTION)
    try:
        assert pointer.read().version == "v2" and pointer.read().fence is None
    finally:
        pointer.close()


def test_train_from_a_milvus_store_a_write_waits_for_a_switch_and_prune(
    retrained_master: Path,
    tmp_path: Path,
    milvus_lite: MilvusLite,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    artifacts = migrated(retrained_master, tmp_path, milvus_lite)
    env = milvus_env(milvus_lite)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    shutil.rmtree(artifacts / "store")  # Milvus is the system of record: train from it
    model = tmp_path / "from-milvus.pt"
    assert main(["train", "--from-store", str(artifacts), "--out", str(model), *FAST]) == 0
    assert "from store" in capsys.readouterr().out
    reindex = ["index", "reindex", "--artifacts", str(artifacts), "--device", "cpu"]
    assert main([*reindex, "--model", str(model), "--nice", "0"]) == 0
    pointer = MilvusPointer(milvus_lite.uri, COLLECTION)
    with (
        serving(artifacts, ready_timeout_s=300, **env) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        # A switch under way (its fence up): a delete waits for it, then lands on v2.
        pointer.write(Pointer("v1", "v2", time.time(), 1))
        time.sleep(LEASE_S)  # as a switch waits after raising its fence
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            client.delete("/v1/items/p3", headers=KEY, timeout=2.0)
        pointer.write(Pointer("v2", None, time.time(), 2))
        assert time.monotonic() - started >= 2.0
        for _ in range(50):
            if client.get("/v1/index/stats").json()["version"] == "v2":
                break
            time.sleep(0.1)
        gone = client.delete("/v1/items/p4", headers=KEY)
        assert gone.status_code == 200, gone.text
    v2 = collection_items(milvus_lite, artifacts, f"{COLLECTION}_v2")
    assert "p3" not in v2 and "p4" not in v2 and "p5" in v2
    # The served version is refused by prune; v1 (not served) goes, its images stay.
    capsys.readouterr()
    assert main(["index", "prune", "--artifacts", str(artifacts), "--version", "v2"]) == 2
    assert "the served one" in capsys.readouterr().err
    images = sorted((artifacts / "images").iterdir())
    assert main(["index", "prune", "--artifacts", str(artifacts), "--version", "v1"]) == 0
    assert sorted((artifacts / "images").iterdir()) == images
    assert COLLECTION not in MilvusClient(uri=milvus_lite.uri).list_collections()
    pointer.close()


def collection_count(client: MilvusClient, name: str) -> int:
    """Items a reindex has upserted so far into collection `name` (0 before it exists)."""
    if not client.has_collection(name):
        return 0
    return int(client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])


def test_a_milvus_reindex_killed_at_seeded_moments_resumes(
    retrained_master: Path, tmp_path: Path, milvus_lite: MilvusLite
) -> None:
    artifacts = Path(shutil.copytree(retrained_master / "artifacts", tmp_path / "artifacts"))
    more = tmp_path / "more"
    write_pairs(more, 120, new_words=True)  # p30..p119 join p0..p29: many batches of 4
    build = ["index", "build", "--artifacts", str(artifacts), "--dataset", "pairs"]
    assert main([*build, "--root", str(more), "--device", "cpu"]) == 0
    migrate = ["index", "migrate", "--artifacts", str(artifacts), "--to", "milvus"]
    assert main([*migrate, "--uri", milvus_lite.uri, "--collection", COLLECTION]) == 0
    oracle = collection_items(milvus_lite, artifacts, COLLECTION)
    assert len(oracle) == 120
    env = {**os.environ, **milvus_env(milvus_lite)}
    command = reindex_command(artifacts, retrained_master / "new.pt", "--batch", "4")
    client = MilvusClient(uri=milvus_lite.uri)
    target = f"{COLLECTION}_v2"
    rng = random.Random(34)
    landed: list[int] = []
    for _ in range(4):
        child = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # A seeded moment: a seeded number of items past what the last run left, plus a
        # seeded delay into the next batch.
        before = collection_count(client, target)
        at = before + rng.randint(1, max(1, (120 - before) // 3))
        started = time.monotonic()
        while child.poll() is None and time.monotonic() - started < 120:
            if collection_count(client, target) >= at:
                time.sleep(rng.uniform(0, 0.05))
                break
            time.sleep(0.02)
        finished = child.poll() == 0
        child.send_signal(signal.SIGKILL)
        child.wait()
        landed.append(collection_count(client, target))
        # The served version is untouched.
        assert collection_items(milvus_lite, artifacts, COLLECTION) == oracle
        if finished:
            break
    assert sum(0 < n < 120 for n in landed) >= 3, landed
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed and finished version v2" in done.stdout, (landed, done.stdout)
    assert collection_items(milvus_lite, artifacts, target) == oracle
    client.close()


def test_replicas_starting_at_once_all_read_the_pointer(milvus_lite: MilvusLite) -> None:
    """The first reading of a fresh Milvus creates the pointer's collection: several processes
    (here, connections) doing it at once all get v1, none fails."""
    pointers = [MilvusPointer(milvus_lite.uri, COLLECTION) for _ in range(4)]
    try:
        with ThreadPoolExecutor(len(pointers)) as pool:
            read = list(pool.map(lambda p: p.read(), pointers))
        assert [r.version for r in read] == ["v1"] * len(pointers)
    finally:
        for pointer in pointers:
            pointer.close()
