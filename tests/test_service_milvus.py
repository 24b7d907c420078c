"""The service with CMH_INDEX_BACKEND=milvus, on embedded milvus-lite: same answers as in memory."""

from __future__ import annotations

import base64
import io
import sqlite3
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from common.errors import InputError
from indexes.milvus import MilvusHammingIndex
from service.app import create_app
from service.settings import Settings

QUERIES = ["a red car", "a small green tree on the left", "a yellow sun", "boat by the sea"]


def search_all(client: TestClient) -> list[list[tuple[int, int]]]:
    out = []
    for text in QUERIES:
        for target in ("image", "text"):
            body = client.post("/v1/search/text", json={"text": text, "k": 20, "target": target})
            assert body.status_code == 200, body.text
            out.append([(h["id"], h["distance"]) for h in body.json()["hits"]])
    return out


def wait(client: TestClient, job_id: str) -> dict[str, object]:
    for _ in range(1200):
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["status"] in ("succeeded", "failed"):
            return status  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_milvus_backend_answers_like_memory_and_keeps_changes(
    demo_artifacts: Path, tmp_path: Path
) -> None:
    uri = str(tmp_path / "milvus.db")
    with TestClient(create_app(Settings(artifacts_dir=demo_artifacts))) as client:
        expected = search_all(client)
    milvus = Settings(artifacts_dir=demo_artifacts, index_backend="milvus", milvus_uri=uri)
    with TestClient(create_app(milvus)) as client:
        assert search_all(client) == expected  # same ids, distances and tie order
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (240, 200, 40)).save(buf, format="PNG")
        item = {
            "id": 777,
            "text": "a yellow sun",
            "image_base64": base64.b64encode(buf.getvalue()).decode(),
        }
        job = client.post("/v1/index/build", json={"items": [item]}).json()["job_id"]
        assert wait(client, job)["status"] == "succeeded"
        hits = client.post(
            "/v1/search/text", json={"text": "a yellow sun", "k": 81, "target": "text"}
        ).json()
        assert 777 in [h["id"] for h in hits["hits"]] and len(hits["hits"]) == 81
        assert client.delete("/v1/items/3").status_code == 200
        assert client.get("/v1/index/stats").json()["items"] == 80
    db = sqlite3.connect(demo_artifacts / "store" / "items.sqlite")
    store_id = db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
    db.close()
    served = MilvusHammingIndex(64, uri=uri, collection=f"cmh_{store_id}_image")
    assert len(served) == 80  # the mirror was kept in step with the add and the delete
    served.close()
    with TestClient(create_app(milvus)) as client:  # a restart reuses the collections
        assert client.get("/v1/index/stats").json()["items"] == 80
        ids = [
            h["id"]
            for h in client.post("/v1/search/text", json={"text": "car", "k": 100}).json()["hits"]
        ]
        assert 3 not in ids and 777 in ids


def test_milvus_backend_needs_a_uri(demo_artifacts_master: Path) -> None:
    with pytest.raises(InputError, match="CMH_MILVUS_URI"):
        with TestClient(
            create_app(Settings(artifacts_dir=demo_artifacts_master, index_backend="milvus"))
        ):
            pass
