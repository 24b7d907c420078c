"""Ingestion into the store: `cmh index build`, migration of generation folders, string ids."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cli.main import main
from service.app import create_app
from service.settings import Settings
from store.store import Store
from tests.helpers import write_legacy_index


def png_b64(colour: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def wait(client: TestClient, job_id: str) -> dict[str, object]:
    for _ in range(2400):
        status: dict[str, object] = client.get(f"/v1/jobs/{job_id}").json()
        if status["status"] in ("succeeded", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def search_ids(client: TestClient, text: str, k: int = 100) -> list[object]:
    body = client.post("/v1/search/text", json={"text": text, "k": k, "target": "text"}).json()
    return [h["id"] for h in body["hits"]]


def test_cli_index_build_streams_a_dataset_and_resumes(
    demo_artifacts: Path, capsys: object
) -> None:
    with TestClient(create_app(Settings(artifacts_dir=demo_artifacts))) as client:
        expected = search_ids(client, "a red car on green grass")
    shutil.rmtree(demo_artifacts / "store")
    argv = ["index", "build", "--artifacts", str(demo_artifacts), "--dataset", "demo"]
    argv += ["--root", str(demo_artifacts / "demo")]
    assert main(argv) == 0
    first = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "indexed 80 of 80 pairs" in first and "0 skipped" in first
    assert main(argv) == 0  # a second run skips every id already durable
    again = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "indexed 0 of 80 pairs" in again and "80 skipped" in again
    # Issue 34: "error" means what it means over HTTP: refused, before anything is written.
    assert main([*argv, "--on-conflict", "error"]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "cmh index: error: expected only new ids (on_conflict error), got 80" in err, err
    assert "Traceback" not in err
    with TestClient(create_app(Settings(artifacts_dir=demo_artifacts))) as client:
        assert client.get("/v1/index/stats").json()["items"] == 80
        # Same codes as the demo build made from cached features: same ranking.
        assert search_ids(client, "a red car on green grass") == expected


def test_cli_index_build_refuses_a_store_that_a_server_holds_before_reading_anything(
    demo_artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The dataset root does not exist: a build that read the dataset before it looked at the
    # lock would answer about the root, not the store.
    with TestClient(create_app(Settings(artifacts_dir=demo_artifacts))):
        argv = ["index", "build", "--artifacts", str(demo_artifacts), "--dataset", "demo"]
        assert main([*argv, "--root", str(tmp_path / "no-such-dataset")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another process has it open" in err[0], err


def test_pairs_marked_query_or_train_are_not_indexed(
    demo_artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README: split "query" is evaluation queries only, "train" training only; only lines
    without a split or with "database" are searched, so only they are indexed."""
    root = tmp_path / "mine"
    shutil.copytree(demo_artifacts / "demo" / "images", root / "photos")
    photos = sorted(p.name for p in (root / "photos").iterdir())[:8]
    splits = [None, "database", "query", "train", None, "query", "database", "train"]
    lines = []
    for i, (photo, split) in enumerate(zip(photos, splits, strict=True)):
        line: dict[str, object] = {"id": f"own-{i}", "image": f"photos/{photo}", "text": "a cat"}
        lines.append(line if split is None else line | {"split": split})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    argv = ["index", "build", "--artifacts", str(demo_artifacts), "--dataset", "pairs"]
    assert main([*argv, "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "indexed 4 of 8 pairs" in out and "4 skipped" in out
    assert "own-2: not indexed: its split says an evaluation query" in out
    assert "own-3: not indexed: its split says for training only" in out
    store = Store.open(demo_artifacts)
    try:
        indexed = store.existing([f"own-{i}" for i in range(8)])
    finally:
        store.close()
    assert sorted(indexed) == ["own-0", "own-1", "own-4", "own-6"]


def test_a_generation_folder_is_migrated_at_startup(demo_artifacts: Path) -> None:
    with TestClient(create_app(Settings(artifacts_dir=demo_artifacts))) as client:
        expected = search_ids(client, "a small green tree")
    store = Store.open(demo_artifacts)
    seqs, image, text = store.live_rows()
    items = [store.get(i) for i in sorted(store.existing(list(range(100))))]
    manifest = store.manifest
    store.close()
    shutil.rmtree(demo_artifacts / "store")
    gen = demo_artifacts / "index" / "gen-1"
    gen.mkdir(parents=True)
    ids = np.asarray([item.id for item in items if item is not None], np.int64)
    for name, codes in (("image", image), ("text", text)):
        write_legacy_index(gen / f"{name}.hidx", n_bits=64, ids=ids, codes=codes)
    lines = [json.dumps({"id": it.id, "text": it.text, "image": it.image}) for it in items if it]
    (gen / "items.jsonl").write_text("\n".join(lines) + "\n")
    (gen / "manifest.json").write_text(json.dumps(manifest.__dict__))
    (demo_artifacts / "index" / "CURRENT").write_text("gen-1")
    assert seqs.size == 80
    with TestClient(create_app(Settings(artifacts_dir=demo_artifacts))) as client:
        assert client.get("/v1/index/stats").json()["items"] == 80
        assert search_ids(client, "a small green tree") == expected
    assert (demo_artifacts / "index.migrated" / "CURRENT").is_file()
    assert not (demo_artifacts / "index").exists()


def test_string_ids_fields_and_replace_through_the_api(demo_artifacts: Path) -> None:
    items = [
        {"id": "IMG_0001.jpg", "text": "a purple kite", "image_base64": png_b64((120, 0, 160))},
        {"id": "007", "text": "a grey whale", "image_base64": png_b64((90, 90, 90))},
        {"id": "900", "text": "an orange fish", "image_base64": png_b64((250, 120, 0))},
        {
            "id": "a/b c",
            "text": "a tagged item",
            "image_base64": png_b64((1, 2, 3)),
            "fields": {"tags": ["news", "2024"], "source": "camera-3"},
        },
    ]
    with TestClient(create_app(Settings(artifacts_dir=demo_artifacts))) as client:
        job = client.post("/v1/index/build", json={"items": items}).json()["job_id"]
        assert wait(client, job)["status"] == "succeeded"
        found = search_ids(client, "kite whale fish", k=84)
        assert "IMG_0001.jpg" in found and "007" in found and "a/b c" in found
        assert 900 in found and "900" not in found  # "900" is the integer 900
        hits = client.post(
            "/v1/search/text", json={"text": "red", "k": 84, "target": "text"}
        ).json()["hits"]
        tagged = next(h for h in hits if h["id"] == "a/b c")  # k = every item: it is there
        assert tagged["fields"] == {"tags": ["news", "2024"], "source": "camera-3"}
        image = client.get(tagged["image_url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        again = client.post("/v1/index/build", json={"items": [dict(items[1], text="x")]})
        assert again.status_code == 400 and "already indexed" in again.text
        replace = {"items": [dict(items[1], text="a blue whale")], "on_conflict": "replace"}
        job = client.post("/v1/index/build", json=replace).json()["job_id"]
        assert wait(client, job)["status"] == "succeeded"
        hits = client.post(
            "/v1/search/text", json={"text": "blue whale", "k": 84, "target": "text"}
        ).json()["hits"]
        assert [h["text"] for h in hits if h["id"] == "007"] == ["a blue whale"]
        assert client.get("/v1/index/stats").json()["items"] == 84
        assert client.delete("/v1/items/IMG_0001.jpg").json()["id"] == "IMG_0001.jpg"
        assert client.delete("/v1/items/900").json()["id"] == 900
        assert client.delete("/v1/items/IMG_0001.jpg").status_code == 404
        assert client.get("/v1/index/stats").json()["items"] == 82
    with TestClient(create_app(Settings(artifacts_dir=demo_artifacts))) as client:
        found = search_ids(client, "kite whale fish")
        assert "IMG_0001.jpg" not in found and 900 not in found and "007" in found
    stored = sorted(p.name for p in (demo_artifacts / "images").iterdir())
    assert len(stored) == 2  # the deleted items' images went with them; 007's (same bytes) stays
