"""The service with CMH_INDEX_BACKEND=milvus: Milvus is the system of record, shared by replicas.

One real milvus-lite server process and two `cmh serve` replicas over real HTTP (B with
`--workers 2`: its workers share the collection too), through kill -9 of a replica and of the
server, and a hung (SIGSTOPped) server. Each replica
has its own copy of the demo artifacts folder: what they share is the collection, as two hosts
would; their job records (artifacts/jobs) stay their own, as a job is polled where it was
posted. Their images/ folders are not shared, so no test reads an item's image file through
the other replica (several hosts need that folder on a shared volume).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from common.errors import InputError
from service.app import create_app
from service.local import service_process, serving
from service.settings import Settings
from tests.conftest import MilvusLite

TIMEOUT_S = 3  # CMH_MILVUS_TIMEOUT_S of the replicas: how long a call waits for a dead server
COLORS = {"red": (220, 30, 30), "yellow": (240, 200, 40), "blue": (30, 60, 220)}


def png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), rgb).save(buf, format="PNG")
    return buf.getvalue()


def items() -> list[dict[str, object]]:
    """Six items, two per color, with the color as a user field."""
    out: list[dict[str, object]] = []
    for n, (color, rgb) in enumerate(COLORS.items()):
        for j in range(2):
            out.append(
                {
                    "id": f"{color}-{j}" if j else 10 + n,
                    "text": f"a {color} sun" if j else f"a small {color} car",
                    "image_base64": base64.b64encode(png(rgb)).decode(),
                    "fields": {"color": color},
                }
            )
    return out


def build(client: httpx.Client, batch: list[dict[str, object]]) -> None:
    """POST a build and poll its job (on the replica that took it) until it succeeds."""
    accepted = client.post("/v1/index/build", json={"items": batch})
    assert accepted.status_code == 202, accepted.text
    job_url = accepted.json()["status_url"]
    for _ in range(600):
        status = client.get(job_url).json()
        if status["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.1)
    assert status["status"] == "succeeded", status


def text_hits(client: httpx.Client, **body: object) -> list[object]:
    found = client.post("/v1/search/text", json={"k": 20, **body})
    assert found.status_code == 200, found.text
    return [hit["id"] for hit in found.json()["hits"]]


def image_hits(client: httpx.Client, color: str, **form: str) -> list[object]:
    files = {"file": ("q.png", png(COLORS[color]), "image/png")}
    found = client.post("/v1/search/image", files=files, data={"k": "20", **form})
    assert found.status_code == 200, found.text
    return [hit["id"] for hit in found.json()["hits"]]


def test_two_replicas_share_one_collection_and_survive_kills(
    demo_artifacts: Path, milvus_lite: MilvusLite
) -> None:
    folder_b = Path(shutil.copytree(demo_artifacts, demo_artifacts.parent / "artifacts-b"))
    env = {
        "CMH_INDEX_BACKEND": "milvus",
        "CMH_MILVUS_URI": milvus_lite.uri,
        "CMH_MILVUS_COLLECTION": "cmh_replicas",
        "CMH_MILVUS_TIMEOUT_S": str(TIMEOUT_S),
    }
    everything = {"red-1", "yellow-1", "blue-1", 10, 11, 12}
    with (
        service_process(demo_artifacts, **env) as (proc_a, url_a),
        serving(folder_b, args=("--workers", "2"), ready_timeout_s=240, **env) as url_b,
        httpx.Client(base_url=url_b, timeout=60) as b,
    ):
        with httpx.Client(base_url=url_a, timeout=60) as a:
            assert a.get("/readyz").json()["index_size"] == 0  # the local demo store is not read
            build(a, items())
        # Built through A, searchable through B: text, image and a filtered search.
        assert set(text_hits(b, text="a red car", target="image")) == everything
        assert set(image_hits(b, "blue")) == everything
        red = {"filter": {"equals": {"color": "red"}}}
        assert set(text_hits(b, text="a red car", **red)) == {10, "red-1"}
        filtered = image_hits(b, "yellow", filter=json.dumps({"in": {"color": ["yellow"]}}))
        assert set(filtered) == {11, "yellow-1"}
        assert b.get("/v1/index/stats").json()["items"] == 6
        # A delete through B is gone from A.
        assert b.delete("/v1/items/blue-1").status_code == 200
        with httpx.Client(base_url=url_a, timeout=60) as a:
            assert "blue-1" not in text_hits(a, text="a blue sun")
            assert a.delete("/v1/items/blue-1").status_code == 404
        proc_a.send_signal(signal.SIGKILL)  # no clean shutdown of replica A
        proc_a.wait()
        everything.discard("blue-1")
        with serving(demo_artifacts, **env) as url_a, httpx.Client(base_url=url_a, timeout=60) as a:
            assert set(text_hits(a, text="a blue sun")) == everything  # nothing lost
            assert a.get("/readyz").json()["index_size"] == 5
            milvus_lite.kill()  # kill -9 of the server: both replicas say 503, promptly
            for client in (a, b):
                started = time.monotonic()
                down = client.post("/v1/search/text", json={"text": "a red car"})
                assert down.status_code == 503, down.text
                assert "Milvus" in down.json()["detail"], down.text
                ready = client.get("/readyz")
                assert ready.status_code == 503 and "Milvus" in ready.json()["detail"]
                assert time.monotonic() - started < 4 * TIMEOUT_S + 5
            milvus_lite.start()
            for client in (a, b):  # back: every acknowledged write is still there
                for _ in range(100):
                    if client.get("/readyz").status_code == 200:
                        break
                    time.sleep(0.2)
                assert set(text_hits(client, text="a red car")) == everything
            milvus_lite.pause()  # hung (SIGSTOP: sockets open, no answer): 503 in time too
            try:
                started = time.monotonic()
                hung = a.post("/v1/search/text", json={"text": "a red car"})
                assert hung.status_code == 503 and "Milvus" in hung.json()["detail"], hung.text
                assert a.get("/readyz").status_code == 503
                assert time.monotonic() - started < 4 * TIMEOUT_S + 5
            finally:
                milvus_lite.resume()
            for _ in range(100):
                if a.get("/readyz").status_code == 200:
                    break
                time.sleep(0.2)
            assert set(text_hits(a, text="a red car")) == everything


def test_milvus_backend_needs_a_uri(demo_artifacts_master: Path) -> None:
    with pytest.raises(InputError, match="CMH_MILVUS_URI"):
        with TestClient(
            create_app(Settings(artifacts_dir=demo_artifacts_master, index_backend="milvus"))
        ):
            pass
