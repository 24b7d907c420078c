"""The service as a user runs it: `python -m cli serve` in its own process, real HTTP on loopback."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bench.local import serving


@contextmanager
def client_for(artifacts: Path, **env: str) -> Iterator[httpx.Client]:
    """A client of the service run over `artifacts` in its own process."""
    with serving(artifacts, **env) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def test_real_process_search_build_restart(demo_artifacts: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (240, 200, 40)).save(buf, format="WEBP")
    item = {
        "id": 424242,
        "text": "a large yellow sun at the top",
        "image_base64": base64.b64encode(buf.getvalue()).decode(),
    }
    with client_for(demo_artifacts, CMH_API_KEY="k3y") as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        text = client.post("/v1/search/text", json={"text": "a small green tree", "k": 4})
        assert text.status_code == 200 and len(text.json()["hits"]) == 4
        image = (demo_artifacts / "demo" / "images" / "00001.jpg").read_bytes()
        found = client.post(
            "/v1/search/image", files={"file": ("a.jpg", image, "image/jpeg")}, data={"k": "2"}
        )
        assert found.status_code == 200 and found.json()["target"] == "text"
        assert client.post("/v1/index/build", json={"items": [item]}).status_code == 401
        accepted = client.post(
            "/v1/index/build", json={"items": [item]}, headers={"X-API-Key": "k3y"}
        )
        assert accepted.status_code == 202
        job_url = accepted.json()["status_url"]
        for _ in range(600):
            status = client.get(job_url).json()
            if status["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.1)
        assert status["status"] == "succeeded", status
        assert client.get("/v1/index/stats").json()["items"] == 81
    with client_for(demo_artifacts) as client:  # a restart keeps the index
        assert client.get("/v1/index/stats").json()["items"] == 81
        assert client.get("/v1/items/424242/image").content[:4] == b"RIFF"


def test_concurrent_image_requests_share_backbone_batches(demo_artifacts: Path) -> None:
    images = [(demo_artifacts / "demo" / "images" / f"{i:05d}.jpg").read_bytes() for i in range(16)]
    with client_for(demo_artifacts, CMH_BATCH_WINDOW_MS="200") as client:

        def search(data: bytes) -> int:
            r = client.post(
                "/v1/search/image", files={"file": ("q.jpg", data, "image/jpeg")}, data={"k": "1"}
            )
            return r.status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(search, images)) == {200}
        metrics = client.get("/metrics").text
    count = float(re.search(r"cmh_image_batch_size_count (\S+)", metrics).group(1))  # type: ignore[union-attr]
    assert count < 16  # 16 requests went through fewer backbone batches


def test_serving_quotes_the_output_of_a_service_that_does_not_come_up(tmp_path: Path) -> None:
    # No checkpoint in an empty artifacts folder: the service exits instead of becoming ready.
    expected = r"expected the service on http://127\.0\.0\.1:\d+ ready within 120 s, got exit code"
    with (
        pytest.raises(RuntimeError, match=expected) as raised,
        serving(tmp_path, ready_timeout_s=120),
    ):
        pass
    # `cmh serve` itself exits 2 with one line saying what is missing and how to make it.
    assert "got exit code 2; its output:" in str(raised.value)
    assert f"cmh serve: error: expected a checkpoint at {tmp_path / 'model.pt'}" in str(
        raised.value
    )
    assert "Traceback" not in str(raised.value)


def test_a_store_that_does_not_match_the_checkpoint_is_refused_in_one_line(
    demo_artifacts: Path,
) -> None:
    db = sqlite3.connect(demo_artifacts / "store" / "items.sqlite")
    manifest = json.loads(db.execute("SELECT value FROM meta WHERE key = 'manifest'").fetchone()[0])
    manifest["vocabulary_sha256"] = "0" * 64
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'manifest'", (json.dumps(manifest),))
    db.close()
    with pytest.raises(RuntimeError) as raised, serving(demo_artifacts, ready_timeout_s=120):
        pass
    output = str(raised.value)
    assert "got exit code 2; its output:" in output
    assert "cmh serve: error: the index does not match the checkpoint: vocabulary_sha256" in output
    assert "Traceback" not in output


def test_unreadable_job_records_are_refused_in_one_line_and_exit_2(demo_artifacts: Path) -> None:
    # Issue 35: the refusal printed, then the batcher's torch thread, left running, aborted the
    # interpreter at exit ("terminate called without an active exception", exit 134).
    (demo_artifacts / "jobs.sqlite").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(RuntimeError) as raised, serving(demo_artifacts, ready_timeout_s=120):
        pass
    output = str(raised.value)
    assert "got exit code 2; its output:" in output, output[-2000:]
    assert "cmh serve: error: the job records in " in output
    assert "move the file away to start without them" in output
    assert "terminate called" not in output and "Traceback" not in output


def worker_pids(artifacts: Path) -> list[int]:
    """The worker processes of the `cmh serve --workers N` over `artifacts` (uvicorn spawns them
    from its parent process, which alone names the folder on its command line)."""

    def cmdline(pid: str) -> str:
        return (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode()

    procs = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]
    parents = {pid for pid in procs if f"serve --artifacts {artifacts} " in cmdline(pid)}
    workers = []
    for pid in procs:
        try:
            ppid = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if ppid in parents and "spawn_main" in cmdline(pid):
                workers.append(int(pid))
        except (OSError, IndexError):
            continue  # it ended while we looked
    return sorted(workers)


@contextmanager
def only(answering: int, others: list[int]) -> Iterator[None]:
    """Requests in the block are answered by one worker: the others are stopped (SIGSTOP) and do
    not accept. Keep the block short: uvicorn replaces a worker silent for
    cli.serve.WORKER_HEALTHCHECK_S."""
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def test_two_workers_share_one_store_and_its_jobs(demo_artifacts: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (240, 200, 40)).save(buf, format="PNG")
    item = {"id": "sun-1", "text": "a large yellow sun at the top"}
    item["image_base64"] = base64.b64encode(buf.getvalue()).decode()
    query = {"text": "a large yellow sun at the top", "k": 100}
    fresh = httpx.Limits(max_keepalive_connections=0)  # each request on a new connection

    def found(client: httpx.Client) -> set[object]:
        hits = client.post("/v1/search/text", json=query)
        assert hits.status_code == 200, hits.text
        return {hit["id"] for hit in hits.json()["hits"]}

    with (
        serving(demo_artifacts, args=("--workers", "2"), ready_timeout_s=240) as url,
        httpx.Client(base_url=url, timeout=60, limits=fresh) as client,
    ):
        a, b = worker_pids(demo_artifacts)
        with only(a, [b]):  # the build is accepted, and run, by worker a
            accepted = client.post("/v1/index/build", json={"items": [item]})
            assert accepted.status_code == 202, accepted.text
        job_url = accepted.json()["status_url"]
        for _ in range(600):  # answered by either worker, never a 404
            status = client.get(job_url)
            assert status.status_code == 200, status.text
            if status.json()["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.1)
        assert status.json()["status"] == "succeeded", status.json()
        with only(b, [a]):  # worker b sees a's write and a's job, and deletes
            assert "sun-1" in found(client)
            assert client.get(job_url).json()["status"] == "succeeded"
            assert client.get("/v1/index/stats").json()["items"] == 81
            assert client.delete("/v1/items/sun-1").status_code == 200
        with only(a, [b]):  # worker a sees b's delete
            assert "sun-1" not in found(client)
            assert client.get("/v1/items/sun-1/image").status_code == 404
        assert worker_pids(demo_artifacts) == [a, b]  # neither was replaced meanwhile
