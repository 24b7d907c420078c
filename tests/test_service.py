"""The HTTP service through TestClient (lifespan runs): every endpoint and every error path."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sqlite3
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from common.errors import InputError
from service.app import create_app
from service.settings import Settings
from tests.helpers import wait_for_job


def client_for(artifacts: Path, **overrides: object) -> TestClient:
    return TestClient(create_app(Settings(artifacts_dir=artifacts, **overrides)))


def png_bytes(
    colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (it would expand when decoded)."""
    data = bytearray(png_bytes(size=(1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_health_ready_stats(demo_artifacts: Path) -> None:
    with client_for(demo_artifacts) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["index_size"] == 80
        stats = client.get("/v1/index/stats").json()
        assert stats["items"] == 80 and stats["n_bits"] == 64
        assert stats["image_backbone"] == "efficientnet-lite0" and stats["vocabulary_size"] > 10


def test_text_search_both_targets(demo_artifacts: Path) -> None:
    with client_for(demo_artifacts) as client:
        for target in ("image", "text"):
            body = client.post(
                "/v1/search/text", json={"text": "a red car", "k": 5, "target": target}
            )
            assert body.status_code == 200, body.text
            result = body.json()
            assert result["target"] == target and len(result["hits"]) == 5
            scores = [h["score"] for h in result["hits"]]  # asymmetric, the default: best first
            assert scores == sorted(scores, reverse=True)
            assert all(0 <= h["distance"] <= 64 for h in result["hits"])
            hit = result["hits"][0]
            assert hit["text"] and hit["image_url"] == f"/v1/items/{hit['id']}/image"
        unknown = client.post("/v1/search/text", json={"text": "zebra xylophone"}).json()
        assert unknown["no_known_words"] is True and unknown["hits"] == []


def test_k_larger_than_index_returns_what_there_is(demo_artifacts: Path) -> None:
    with client_for(demo_artifacts, max_k=500) as client:
        result = client.post("/v1/search/text", json={"text": "boat", "k": 200}).json()
        assert len(result["hits"]) == 80


def test_image_search_with_a_demo_image(demo_artifacts: Path) -> None:
    image = (demo_artifacts / "demo" / "images" / "00004.jpg").read_bytes()
    with client_for(demo_artifacts) as client:
        response = client.post(
            "/v1/search/image", files={"file": ("q.jpg", image, "image/jpeg")}, data={"k": "3"}
        )
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["target"] == "text" and len(result["hits"]) == 3
        same = client.post(
            "/v1/search/image",
            files={"file": ("q.jpg", image, "image/jpeg")},
            data={"k": "1", "target": "image"},
        ).json()
        assert same["hits"][0]["distance"] == 0  # the indexed copy of the same picture
        img = client.get(same["hits"][0]["image_url"])
        assert img.status_code == 200 and img.content.startswith(b"\xff\xd8")


@pytest.mark.parametrize(
    ("payload", "status", "detail"),
    [
        ({"text": "car", "k": 101}, 400, "expected k in 1..100, got 101"),
        ({"text": "car", "k": 0}, 422, None),
        ({"text": "", "k": 3}, 422, None),
        ({"text": "car", "target": "video"}, 422, None),
    ],
)
def test_text_search_bad_input(
    demo_artifacts_master: Path, payload: dict[str, object], status: int, detail: str | None
) -> None:
    with client_for(demo_artifacts_master) as client:
        response = client.post("/v1/search/text", json=payload)
        assert response.status_code == status
        if detail is not None:
            assert response.json()["detail"] == detail


def test_image_search_errors(demo_artifacts_master: Path) -> None:
    with client_for(
        demo_artifacts_master, max_upload_bytes=5000, max_image_pixels=10_000
    ) as client:

        def post(data: bytes, content_type: str = "image/png") -> tuple[int, str]:
            r = client.post("/v1/search/image", files={"file": ("x", data, content_type)})
            return r.status_code, str(r.json().get("detail"))

        assert post(b"hello", "text/plain") == (415, "expected an image/* upload, got 'text/plain'")
        status, _ = post(b"definitely not a png", "IMAGE/PNG")  # media types ignore case
        assert status == 400
        status, detail = post(b"\x00" * 6000)
        assert status == 413 and "at most 5000 bytes" in detail
        status, detail = post(b"definitely not a png")
        assert status == 400 and detail.startswith("could not decode image")
        status, detail = post(bomb_png(10_000, 5_000))  # over our limit: refused before decoding
        assert status == 400 and "expected at most 10000 pixels, got 10000x5000" in detail
        status, detail = post(bomb_png(50_000, 50_000))  # PIL's own bomb guard fires first
        assert status == 400 and "decompression bomb" in detail
        missing = client.post("/v1/search/image", data={"k": "3"})
        assert missing.status_code == 422


def test_body_limit(demo_artifacts_master: Path) -> None:
    with client_for(demo_artifacts_master, max_body_bytes=100) as client:
        response = client.post("/v1/search/text", json={"text": "x" * 500})
        assert response.status_code == 413 and "at most 100 bytes" in response.json()["detail"]


def test_build_adds_items_and_a_restart_keeps_them(demo_artifacts: Path) -> None:
    items = [
        {
            "id": 5000,
            "text": "a large red car on the left",
            "image_base64": base64.b64encode(png_bytes()).decode(),
        },
        {
            "id": 5001,
            "text": "a small blue boat",
            "image_base64": base64.b64encode(png_bytes((20, 40, 220))).decode(),
        },
    ]
    with client_for(demo_artifacts) as client:
        accepted = client.post("/v1/index/build", json={"items": items})
        assert accepted.status_code == 202, accepted.text
        status = wait_for_job(client, accepted.json()["job_id"])
        assert status["status"] == "succeeded" and status["added"] == 2
        assert status["done"] == status["total"] == 2
        assert client.get("/v1/index/stats").json()["items"] == 82
        hits = client.post(
            "/v1/search/text", json={"text": "a small blue boat", "k": 82, "target": "text"}
        ).json()
        assert 5001 in [h["id"] for h in hits["hits"]]
        assert client.get("/v1/items/5001/image").content.startswith(b"\x89PNG")
    with client_for(demo_artifacts) as client:  # a restart reads the persisted generation
        assert client.get("/v1/index/stats").json()["items"] == 82


def test_invalid_build_is_rejected_whole_and_changes_nothing(demo_artifacts: Path) -> None:
    good = base64.b64encode(png_bytes()).decode()
    items = [
        {"id": 6000, "text": "fine", "image_base64": good},
        {"id": 6000, "text": "same id again", "image_base64": good},
        {"id": 3, "text": "already indexed", "image_base64": good},
        {"id": 6002, "text": "not base64", "image_base64": "%%%"},
        {"id": 6003, "text": "not an image", "image_base64": base64.b64encode(b"plain").decode()},
        {"id": 6004, "text": "no data dir", "image_path": "x.png"},
    ]
    with client_for(demo_artifacts) as client:
        before = client.get("/v1/index/stats").json()["generation"]
        response = client.post("/v1/index/build", json={"items": items})
        assert response.status_code == 400
        body = response.json()
        assert body["detail"] == "5 of 6 items are invalid"
        reasons = {e["index"]: e["reason"] for e in body["errors"]}
        assert set(reasons) == {1, 2, 3, 4, 5}
        assert "twice" in reasons[1] and "already indexed" in reasons[2]
        assert "base64" in reasons[3] and "could not decode image" in reasons[4]
        assert "CMH_SERVER_DATA_DIR" in reasons[5]
        stats = client.get("/v1/index/stats").json()
        assert stats["items"] == 80 and stats["generation"] == before


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"items": []},
        {"items": [{"id": 1, "text": "x"}]},
        {"items": [{"id": 1, "text": "x", "image_base64": "AA==", "image_path": "a.png"}]},
        {"dataset": {"name": "wikipedia", "root": "w"}},
    ],
)
def test_build_schema_errors_are_422(demo_artifacts_master: Path, body: dict[str, object]) -> None:
    with client_for(demo_artifacts_master) as client:
        assert client.post("/v1/index/build", json=body).status_code == 422


def test_build_from_server_paths_stays_inside_the_data_folder(
    demo_artifacts: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "ok.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    items = [{"id": 7000, "text": "ok", "image_path": "ok.png"}]
    with client_for(demo_artifacts, server_data_dir=data_dir) as client:
        escape = client.post(
            "/v1/index/build",
            json={"items": [{"id": 7001, "text": "x", "image_path": "../secret.png"}]},
        )
        assert escape.status_code == 400 and "inside the server data folder" in escape.text
        job = client.post("/v1/index/build", json={"items": items}).json()["job_id"]
        assert wait_for_job(client, job)["status"] == "succeeded"


def test_dataset_build_into_an_empty_index(
    demo_artifacts: Path, tiny_demo_root: Path, tmp_path: Path
) -> None:
    shutil.rmtree(demo_artifacts / "store")  # keep the checkpoint, drop the index
    with client_for(demo_artifacts, server_data_dir=tiny_demo_root.parent) as client:
        assert client.get("/readyz").json()["index_size"] == 0
        accepted = client.post(
            "/v1/index/build", json={"dataset": {"name": "demo", "root": "demo"}}
        )
        status = wait_for_job(client, accepted.json()["job_id"])
        assert status["status"] == "succeeded" and status["added"] == 20
        again = client.post("/v1/index/build", json={"dataset": {"name": "demo", "root": "demo"}})
        resumed = wait_for_job(client, again.json()["job_id"])  # a rerun resumes: skips them all
        assert resumed["status"] == "succeeded" and resumed["added"] == 0
        assert len(resumed["skipped"]) == 20
        assert all(s.endswith("already indexed") for s in resumed["skipped"])
        assert client.get("/v1/index/stats").json()["items"] == 20


def test_delete(demo_artifacts: Path) -> None:
    with client_for(demo_artifacts) as client:
        assert client.delete("/v1/items/7").json()["removed"] is True
        assert client.delete("/v1/items/7").status_code == 404
        result = client.post("/v1/search/text", json={"text": "car", "k": 100}).json()
        assert 7 not in [h["id"] for h in result["hits"]] and len(result["hits"]) == 79
        assert client.get("/v1/items/7/image").status_code == 404
    with client_for(demo_artifacts) as client:
        assert client.get("/v1/index/stats").json()["items"] == 79


def test_api_key_guards_build_and_delete(demo_artifacts: Path) -> None:
    item = {"id": 9000, "text": "x", "image_base64": base64.b64encode(png_bytes()).decode()}
    with client_for(demo_artifacts, api_key="s3cret") as client:
        assert client.delete("/v1/items/1").status_code == 401
        assert client.delete("/v1/items/1", headers={"X-API-Key": "wrong"}).status_code == 401
        response = client.post("/v1/index/build", json={"items": [item]})
        assert response.status_code == 401
        assert response.json()["detail"] == "expected a valid X-API-Key header for this endpoint"
        ok = client.post("/v1/index/build", json={"items": [item]}, headers={"X-API-Key": "s3cret"})
        assert ok.status_code == 202
        assert client.delete("/v1/items/1", headers={"X-API-Key": "s3cret"}).status_code == 200
        # searching needs no key
        assert client.post("/v1/search/text", json={"text": "car"}).status_code == 200


def test_unknown_job_and_item(demo_artifacts_master: Path) -> None:
    with client_for(demo_artifacts_master) as client:
        assert client.get("/v1/jobs/nope").status_code == 404
        assert (
            client.get("/v1/items/123456/image").json()["detail"]
            == "expected an indexed id, got 123456"
        )


def test_metrics(demo_artifacts_master: Path) -> None:
    with client_for(demo_artifacts_master) as client:
        client.post("/v1/search/text", json={"text": "car"})
        text = client.get("/metrics").text
        assert 'cmh_requests_total{method="POST",route="/v1/search/text",status="200"} 1.0' in text
        assert 'cmh_index_items{modality="image"} 80.0' in text
        assert "cmh_encode_seconds_count" in text and "cmh_request_seconds_bucket" in text


def test_openapi_documents_the_endpoints(demo_artifacts_master: Path) -> None:
    with client_for(demo_artifacts_master) as client:
        paths = client.get("/openapi.json").json()["paths"]
        assert {
            "/v1/search/text",
            "/v1/search/image",
            "/v1/index/build",
            "/v1/jobs/{job_id}",
        } <= set(paths)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_bits", 32, "n_bits is 32 in the index, 64 in the checkpoint"),
        ("vocabulary_sha256", "0" * 64, "vocabulary_sha256 is '000"),
        ("image_backbone", "vgg19", "image_backbone is 'vgg19' in the index, 'efficientnet-lite0'"),
    ],
)
def test_index_that_does_not_match_the_checkpoint_refuses_to_start(
    demo_artifacts: Path, field: str, value: object, message: str
) -> None:
    db = sqlite3.connect(demo_artifacts / "store" / "items.sqlite")
    manifest = json.loads(db.execute("SELECT value FROM meta WHERE key = 'manifest'").fetchone()[0])
    manifest[field] = value
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'manifest'", (json.dumps(manifest),))
    db.close()
    with pytest.raises(InputError, match=re.escape(message)):
        with client_for(demo_artifacts):
            pass


def test_missing_checkpoint_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="checkpoint"):
        with client_for(tmp_path):
            pass


def test_build_while_searching_gives_no_errors_and_no_torn_results(demo_artifacts: Path) -> None:
    items = [
        {
            "id": 10_000 + i,
            "text": f"a red balloon number {i}",
            "image_base64": base64.b64encode(png_bytes((i * 9 % 255, 80, 120))).decode(),
        }
        for i in range(24)
    ]
    failures: list[str] = []
    generations: set[str] = set()
    stop = threading.Event()
    with client_for(demo_artifacts) as client:

        def searcher() -> None:
            while not stop.is_set():
                r = client.post(
                    "/v1/search/text", json={"text": "red balloon", "k": 100, "target": "text"}
                )
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                body = r.json()
                generations.add(body["generation"])
                n = len(body["hits"])
                if n not in (80, 100):  # 80 before the swap; after it 104 items, k = 100
                    failures.append(f"torn result: {n} hits")

        threads = [threading.Thread(target=searcher) for _ in range(3)]
        for t in threads:
            t.start()
        job = client.post("/v1/index/build", json={"items": items}).json()["job_id"]
        status = wait_for_job(client, job)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
    assert status["status"] == "succeeded"
    assert not failures
    assert len(generations) == 2


def test_text_searches_beyond_the_search_threads_wait_and_all_answer(demo_artifacts: Path) -> None:
    # One search thread: the filtered searches beyond it wait in the event loop for it, the
    # unfiltered ones run in the event loop between them, and each request gets its own
    # answer, the same as alone.
    texts = ["a red car", "a small green tree", "a yellow sun", "two balloons", "pink flower"] * 4
    some = {"ids": list(range(0, 3000, 7))}
    bodies = [
        {"text": t, "k": 5} | ({"filter": some} if i % 2 else {}) for i, t in enumerate(texts)
    ]
    with client_for(demo_artifacts, search_threads=1) as client:
        assert client.app.state.serving.current().text_searches.total_tokens == 1
        alone = [client.post("/v1/search/text", json=body).json() for body in bodies]
        with ThreadPoolExecutor(8) as pool:
            together = list(
                pool.map(lambda body: client.post("/v1/search/text", json=body).json(), bodies)
            )
    assert together == alone
    assert all(hit["id"] % 7 == 0 for answer in alone[1::2] for hit in answer["hits"])
    assert any(hit["id"] % 7 for answer in alone[::2] for hit in answer["hits"])
