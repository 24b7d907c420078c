"""A retrain and switch as a user runs it: `cmh serve` in its own process(es) under a client that
keeps searching, adding and deleting over HTTP while `cmh index reindex` runs in another process
and POST /v1/admin/reload switches; and `cmh index reindex` killed (SIGKILL) at seeded moments."""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from bench.local import service_process, serving
from cli.main import main
from service.app import create_app
from service.settings import Settings
from store import versions
from tests.helpers import wait_for_job
from tests.test_train_from_store import write_pairs
from tests.test_versions import items_of, retrained_master, upload

__all__ = ["retrained_master"]  # the module fixture, shared with tests/test_versions.py
KEY = {"X-API-Key": "k"}
FRESH = httpx.Limits(max_keepalive_connections=0)  # each request on a new connection: any worker


def reindex_command(artifacts: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "cli", "index", "reindex", "--artifacts", str(artifacts),
        "--model", str(model), "--device", "cpu", *extra,
    ]  # fmt: skip


class Traffic:
    """Clients searching, adding (build jobs) and deleting until stopped; every answer that is
    not the expected one is a failure; the acknowledged writes are the oracle."""

    def __init__(self, url: str, seed: int, prefix: str = "w") -> None:
        self.url = url
        self.prefix = prefix  # of the ids it adds: one per client writing at once
        self.rng = random.Random(seed)
        self.failures: list[str] = []
        self.added: dict[str, tuple[str, dict[str, Any]]] = {}  # id -> (text, fields), acked
        self.deleted: set[str] = set()
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=300)

    def _check(self, response: httpx.Response, status: int, what: str) -> bool:
        self.requests += 1
        if response.status_code != status:
            self.failures.append(f"{what}: {response.status_code} {response.text[:200]}")
            return False
        return True

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120, limits=FRESH) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                roll = self.rng.random()
                try:
                    if roll < 0.6:
                        query = {"text": self.rng.choice(["red disc", "crimson", "a blue disc"])}
                        self._check(client.post("/v1/search/text", json=query), 200, "search")
                    elif roll < 0.85 or not self.added.keys() - self.deleted:
                        item = upload(1000 + n, "red", f"a crimson kite {n}")
                        item["id"] = f"{self.prefix}{n}"
                        accepted = client.post(
                            "/v1/index/build", json={"items": [item]}, headers=KEY
                        )
                        if self._check(accepted, 202, "build"):
                            job = wait_for_job(client, accepted.json()["job_id"], timeout=300)
                            if job["status"] == "succeeded":
                                self.added[str(item["id"])] = (str(item["text"]), {"i": 1000 + n})
                            else:
                                self.failures.append(f"job {job}")
                    else:
                        gone = self.rng.choice(sorted(self.added.keys() - self.deleted))
                        answer = client.delete(f"/v1/items/{gone}", headers=KEY)
                        if self._check(answer, 200, f"delete {gone}"):
                            self.deleted.add(gone)
                except httpx.HTTPError as err:
                    self.failures.append(f"{type(err).__name__}: {err}")


@pytest.mark.parametrize("workers", [1, 2])
def test_retrain_reindex_and_switch_under_live_traffic(
    retrained_master: Path,
    tmp_path: Path,
    workers: int,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    artifacts = Path(shutil.copytree(retrained_master / "artifacts", tmp_path / "artifacts"))
    model = retrained_master / "new.pt"
    base = items_of(artifacts)
    args = ("--workers", str(workers))
    with serving(artifacts, args=args, ready_timeout_s=300, CMH_API_KEY="k") as url:
        with Traffic(url, seed=workers) as traffic, httpx.Client(base_url=url, timeout=120) as c:
            time.sleep(1.0)
            built = subprocess.run(
                reindex_command(artifacts, model), capture_output=True, text=True, timeout=600
            )
            assert built.returncode == 0, built.stderr[-2000:]
            time.sleep(1.0)  # writes after the reindex: the switch carries them over
            switched = c.post("/v1/admin/reload", headers=KEY)
            assert switched.status_code == 200, switched.text
            assert switched.json()["version"] == "v2"
            # Acknowledged: every worker answers with the new model from now on.
            with httpx.Client(base_url=url, timeout=120, limits=FRESH) as fresh:
                for _ in range(12):
                    body = fresh.post("/v1/search/text", json={"text": "crimson"}).json()
                    assert not body["no_known_words"], body
            time.sleep(1.5)
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.requests > 20 and len(traffic.added) >= 2
        stats = httpx.get(f"{url}/v1/index/stats").json()
        assert stats["version"] == "v2"
        # While it serves, the folder is switched through the server, in one command.
        rollback = ["index", "rollback", "--artifacts", str(artifacts)]
        assert main(rollback) == 2
        assert "with --url" in capsys.readouterr().err
        monkeypatch.setenv("CMH_API_KEY", "k")
        assert main([*rollback, "--url", url]) == 0
        assert "now serving v1" in capsys.readouterr().out
        assert httpx.get(f"{url}/v1/index/stats").json()["version"] == "v1"
        known = httpx.post(f"{url}/v1/search/text", json={"text": "crimson"}).json()
        assert known["no_known_words"]  # v1's model again
        assert main([*rollback[:1], "switch", *rollback[2:], "--url", url]) == 0
    # Every acknowledged write is in the new version with its exact caption and fields.
    v2 = items_of(artifacts / "versions" / "v2")
    expected = {k: (t, f) for k, (t, _, _, f) in base.items()}
    expected.update({k: v for k, v in traffic.added.items() if k not in traffic.deleted})
    assert {k: (t, f) for k, (t, _, _, f) in v2.items()} == expected
    assert versions.current_name(artifacts) == "v2"


def target_count(artifacts: Path, name: str) -> int:
    """Items a reindex has committed so far into version `name` (0 before its store exists)."""
    db = artifacts / "versions" / name / "store" / "items.sqlite"
    if not db.is_file():
        return 0
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_reindex_killed_at_seeded_moments_resumes_and_the_old_version_serves(
    retrained_master: Path, tmp_path: Path
) -> None:
    artifacts = Path(shutil.copytree(retrained_master / "artifacts", tmp_path / "artifacts"))
    more = tmp_path / "more"
    write_pairs(more, 160, new_words=True)  # p30..p159 join p0..p29: a reindex of many batches
    build = ["index", "build", "--artifacts", str(artifacts), "--dataset", "pairs"]
    assert main([*build, "--root", str(more), "--device", "cpu"]) == 0
    oracle = items_of(artifacts)
    assert len(oracle) == 160
    model = retrained_master / "new.pt"
    rng = random.Random(33)
    landed: list[int] = []
    for _ in range(10):
        child = subprocess.Popen(
            reindex_command(artifacts, model, "--batch", "4"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # A seeded moment: a few items past what the last run left (at a commit, plus a seeded
        # delay into the next batch), or, one time in five, a seeded time after the start.
        before = target_count(artifacts, "v2")
        at = before + rng.randint(1, max(1, (160 - before) // 3))
        started, wait_s = time.monotonic(), rng.uniform(0.5, 4.0)
        early = rng.random() < 0.2
        while child.poll() is None and time.monotonic() - started < 120:
            if early and time.monotonic() - started >= wait_s:
                break
            if not early and target_count(artifacts, "v2") >= at:
                time.sleep(rng.uniform(0, 0.05))
                break
            time.sleep(0.005)
        finished = child.poll() == 0
        child.send_signal(signal.SIGKILL)
        child.wait()
        landed.append(target_count(artifacts, "v2"))
        # The served version is untouched: every item as it was.
        assert items_of(artifacts) == oracle
        assert versions.current_name(artifacts) == "v1"
        if finished:
            break
    # the kills fell in the middle of the copy, and each run went on from where the last stopped
    assert sum(0 < n < 160 for n in landed) >= 5, landed
    assert landed == sorted(landed), landed
    # The old version serves after the kills, as it did before.
    with TestClient(create_app(Settings(artifacts_dir=artifacts, device="cpu"))) as client:
        stats = client.get("/v1/index/stats").json()
        assert (stats["version"], stats["items"]) == ("v1", 160)
    done = subprocess.run(
        reindex_command(artifacts, model), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed and finished version v2" in done.stdout, (landed, done.stdout)
    assert items_of(artifacts / "versions" / "v2") == oracle
    assert [v.state for v in versions.versions(artifacts)] == ["ready", "ready"]


def test_a_second_model_is_refused_while_a_reindex_is_unfinished(
    retrained_master: Path, tmp_path: Path
) -> None:
    artifacts = Path(shutil.copytree(retrained_master / "artifacts", tmp_path / "artifacts"))
    folder = artifacts / "versions" / "v2"
    folder.mkdir(parents=True)
    versions.write_state(folder, {"state": "building", "source": "v1", "model_sha256": "0" * 64})
    done = subprocess.run(
        reindex_command(artifacts, retrained_master / "new.pt"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2
    assert "expected no unfinished reindex, found v2" in done.stderr
    assert "cmh index prune" in done.stderr and "Traceback" not in done.stderr


def test_sigusr1_switches_a_running_server_and_a_refusal_keeps_it_serving(
    retrained_master: Path, tmp_path: Path
) -> None:
    artifacts = Path(shutil.copytree(retrained_master / "artifacts", tmp_path / "artifacts"))
    with (
        service_process(artifacts, ready_timeout_s=300) as (proc, url),
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        proc.send_signal(signal.SIGUSR1)  # nothing newer to switch to: a warning, no switch
        time.sleep(1.0)
        assert client.get("/v1/index/stats").json()["version"] == "v1"
        built = subprocess.run(
            reindex_command(artifacts, retrained_master / "new.pt"),
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr[-2000:]
        proc.send_signal(signal.SIGUSR1)
        for _ in range(300):
            if client.get("/v1/index/stats").json()["version"] == "v2":
                break
            time.sleep(0.1)
        assert client.get("/v1/index/stats").json()["version"] == "v2"
        body = client.post("/v1/search/text", json={"text": "crimson"}).json()
        assert not body["no_known_words"], body
    assert versions.current_name(artifacts) == "v2"
