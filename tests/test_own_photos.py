"""A user's own captioned photos, as the README tells them: data check, features, train, index
build, serve, through the real command line and the app."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from cli.main import main
from service.app import create_app
from service.settings import Settings

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
}
SHAPES = ("circle", "square")


def write_photos(root: Path, n: int = 48) -> list[dict[str, object]]:
    """n small photos of coloured shapes with captions, and a pairs.jsonl naming them."""
    rng = np.random.default_rng(0)
    records: list[dict[str, object]] = []
    (root / "photos").mkdir(parents=True)
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        image = Image.new("RGB", (96, 96), tuple(int(c) for c in rng.integers(200, 255, 3)))
        draw = ImageDraw.Draw(image)
        box = (20, 20, 76, 76)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        name = f"photos/IMG_{i:04d}.jpg"
        image.save(root / name, quality=90)
        records.append(
            {
                "id": f"IMG_{i:04d}.jpg",
                "image": name,
                "text": f"a {colour} {shape} on paper",
                "place": "desk",
            }  # fmt: skip
        )
    records.append({"id": "broken", "image": "photos/missing.jpg", "text": "no such file"})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return records


@pytest.mark.slow
def test_own_photos_from_pairs_jsonl_to_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, artifacts = tmp_path / "mine", tmp_path / "artifacts"
    write_photos(root)
    data = ["--dataset", "pairs", "--root", str(root)]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["data", "check", *data, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["loaded"] == 48 and report["rejected"] == 1
    assert main(["features", *data, *cache]) == 0
    assert "images=48" in capsys.readouterr().out
    checkpoint = artifacts / "model.pt"
    argv = ["train", *data, *cache, "--out", str(checkpoint), "--bits", "16", "--epochs", "8"]
    assert main([*argv, "--k", "5", "--n-val", "12", "--anchors", "24"]) == 0
    history = torch.load(checkpoint, weights_only=True)["history"]
    # No labels: validation scores each pair's own partner, so epochs are told apart.
    assert max(row["val_i2t"] for row in history) > 0
    assert main(["index", "build", "--artifacts", str(artifacts), *data]) == 0
    built = capsys.readouterr().out
    assert "indexed 48 of 48 pairs" in built
    with TestClient(create_app(Settings(artifacts_dir=artifacts))) as client:
        assert client.get("/v1/index/stats").json()["items"] == 48
        body = client.post(
            "/v1/search/text", json={"text": "a red circle", "k": 5, "target": "image"}
        ).json()
        hits = body["hits"]
        assert len(hits) == 5 and all(str(h["id"]).startswith("IMG_") for h in hits)
        assert hits[0]["fields"] == {"place": "desk"}
        image = client.get(hits[0]["image_url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"


@pytest.mark.slow
def test_own_photos_with_the_lite1_backbone_are_served_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--backbone efficientnet-lite1` from features to the served app: the checkpoint records
    it, the service loads it, and a photo searched by upload finds its own stored code."""
    root, artifacts = tmp_path / "mine", tmp_path / "artifacts"
    write_photos(root, n=24)
    data = ["--dataset", "pairs", "--root", str(root), "--backbone", "efficientnet-lite1"]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    checkpoint = artifacts / "model.pt"
    argv = ["train", *data, *cache, "--out", str(checkpoint), "--bits", "16", "--epochs", "3"]
    assert main([*argv, "--k", "5", "--n-val", "6", "--anchors", "12"]) == 0
    assert torch.load(checkpoint, weights_only=True)["image_backbone"] == "efficientnet-lite1"
    index = ["index", "build", "--artifacts", str(artifacts), "--dataset", "pairs"]
    assert main([*index, "--root", str(root)]) == 0
    assert "indexed 24 of 24 pairs" in capsys.readouterr().out
    with TestClient(create_app(Settings(artifacts_dir=artifacts))) as client:
        stats = client.get("/v1/index/stats").json()
        assert stats["image_backbone"] == "efficientnet-lite1" and stats["items"] == 24
        photo = (root / "photos" / "IMG_0005.jpg").read_bytes()
        found = client.post(
            "/v1/search/image",
            files={"file": ("q.jpg", photo, "image/jpeg")},
            data={"k": "24", "target": "image"},
        )
        assert found.status_code == 200, found.text
        hits = {h["id"]: h["distance"] for h in found.json()["hits"]}
        assert hits["IMG_0005.jpg"] == 0
