"""`cmh train --from-store`: training on what a store serves, through the real command line, on a
store built by `cmh index build` (and the HTTP build, for items that carry labels)."""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

import models.features.content_cache as content_cache
from cli.dataset_args import STORE_CACHE_DIR
from cli.main import main
from common.errors import InputError
from models.data.dataset import PairDataset
from models.data.stored import stored_pairs
from models.features.content_cache import FeatureCache, features_by_content, file_sha256
from models.methods import compare
from models.methods.trained import Trained
from service.app import create_app
from service.settings import Settings
from store.snapshot import image_sha256, read_items
from store.store import Store
from tests.helpers import store_manifest, wait_for_job

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
# Words of the indexed captions that the first model's training captions never had.
NEW_WORDS = {"red": "crimson", "green": "emerald", "blue": "azure"}
QUICK = ["--epochs", "2", "--k", "5", "--anchors", "8", "--n-val", "6", "--bits", "16"]
FAST = [*QUICK, "--device", "cpu", "--method", "aucmh"]


def photo(i: int, colour: str) -> Image.Image:
    """A small photo of a coloured disc on a pale ground, distinct per i."""
    image = Image.new("RGB", (48, 48), (200 + i % 50, 230, 240 - i % 40))
    ImageDraw.Draw(image).ellipse((10, 10, 38, 38), fill=COLOURS[colour])
    return image


def write_pairs(root: Path, n: int, *, new_words: bool) -> None:
    """n photos and a pairs.jsonl captioning them (with NEW_WORDS, or without)."""
    (root / "photos").mkdir(parents=True)
    records = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        name = f"photos/{i:03d}.png"
        photo(i, colour).save(root / name)
        word = f" {NEW_WORDS[colour]}" if new_words else ""
        text = f"a {colour}{word} disc number {i % 4}"
        records.append({"id": f"p{i}", "image": name, "text": text, "place": "desk"})
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def build_served(base: Path) -> Path:
    """base/artifacts: a model trained on 18 plain captions, serving a store of 30 items whose
    captions hold NEW_WORDS (built by `cmh index build`)."""
    first, indexed, artifacts = base / "first", base / "indexed", base / "artifacts"
    write_pairs(first, 18, new_words=False)
    write_pairs(indexed, 30, new_words=True)
    train = ["train", "--dataset", "pairs", "--root", str(first), "--cache-dir", str(base / "c")]
    assert main([*train, "--out", str(artifacts / "model.pt"), *FAST]) == 0
    build = ["index", "build", "--artifacts", str(artifacts), "--dataset", "pairs"]
    assert main([*build, "--root", str(indexed), "--device", "cpu"]) == 0
    return artifacts


def stored_dataset(artifacts: Path) -> PairDataset:
    """The PairDataset `cmh train --from-store` reads from a folder's store (every item)."""
    stored = read_items(artifacts, max_items=1000, seed=0)
    return stored_pairs(
        artifacts,
        ids=[it.id for it in stored.items],
        texts=[it.text for it in stored.items],
        images=[it.image for it in stored.items],
        fields=[it.fields for it in stored.items],
        n_live=stored.n_live,
    )


@pytest.fixture(scope="module")
def served_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifacts folder (build_served); read-only."""
    return build_served(tmp_path_factory.mktemp("served"))


@pytest.fixture
def served(served_master: Path, tmp_path: Path) -> Path:
    """A private copy of the served artifacts, for a test that writes its feature cache."""
    return Path(shutil.copytree(served_master, tmp_path / "artifacts"))


def from_store(artifacts: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--from-store", str(artifacts), "--out", str(out), *FAST, *extra]


def test_trains_on_the_stored_texts_and_reuses_image_features(
    served: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = torch.load(served / "model.pt", weights_only=True)["vocabulary"]
    assert "crimson" not in before  # the served model never saw the stored captions' new words
    capsys.readouterr()
    assert main(from_store(served, tmp_path / "new.pt")) == 0
    out = capsys.readouterr().out
    assert "30 items" in out and "0 from the feature cache, 30 encoded" in out
    vocabulary = torch.load(tmp_path / "new.pt", weights_only=True)["vocabulary"]
    assert {"crimson", "emerald", "azure"} <= set(vocabulary)
    cache = FeatureCache(served / STORE_CACHE_DIR)
    assert len(cache) == 30 and cache.dim("efficientnet-lite0") == 1280
    cache.close()

    # Stored images are named by their bytes' SHA-256: a warm run reads none of them.
    for item in read_items(served, max_items=100, seed=0).items:
        assert image_sha256(item.image) == file_sha256(served / item.image)

    def no_backbone(*args: object, **kwargs: object) -> None:
        raise AssertionError("the backbone ran although every image is in the feature cache")

    def no_reading(path: Path) -> str:
        raise AssertionError(f"{path} was read although its name says its digest")

    monkeypatch.setattr(content_cache, "load_backbone", no_backbone)
    monkeypatch.setattr(content_cache, "file_sha256", no_reading)
    assert main(from_store(served, tmp_path / "again.pt")) == 0
    assert "30 from the feature cache, 0 encoded" in capsys.readouterr().out
    # The checkpoint serves as any other: a store is built with it, and the app opens it.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(tmp_path / "again.pt", fresh / "model.pt")
    root = tmp_path / "pairs"
    write_pairs(root, 12, new_words=True)
    build = ["index", "build", "--artifacts", str(fresh), "--dataset", "pairs", "--root", str(root)]
    monkeypatch.undo()
    assert main([*build, "--device", "cpu"]) == 0
    with TestClient(create_app(Settings(artifacts_dir=fresh))) as client:
        assert client.get("/v1/index/stats").json()["items"] == 12
        body = client.post("/v1/search/text", json={"text": "crimson", "k": 3}).json()
        assert len(body["hits"]) == 3


def test_max_items_takes_a_seeded_sample(
    served: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = read_items(served, max_items=12, seed=0)
    again = read_items(served, max_items=12, seed=0)
    other = read_items(served, max_items=12, seed=1)
    ids = [item.id for item in first.items]
    assert first.n_live == 30 and len(ids) == 12 and len(set(ids)) == 12
    assert ids == [item.id for item in again.items]
    assert ids != [item.id for item in other.items]
    order = [int(str(i).removeprefix("p")) for i in ids]
    assert order == sorted(order)  # in the store's order
    assert len(read_items(served, max_items=30, seed=5).items) == 30
    capsys.readouterr()
    assert main(from_store(served, tmp_path / "m.pt", "--max-items", "12")) == 0
    out = capsys.readouterr().out
    assert "12 items" in out and "a seeded sample of 12 of 30 live items" in out
    assert "12 encoded" in out  # only the sampled items' images went through the backbone


def test_reads_a_store_a_server_holds_open_with_its_backbone(
    served: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = sqlite3.connect(served / "store" / "items.sqlite")
    (text,) = conn.execute("SELECT value FROM meta WHERE key = 'manifest'").fetchone()
    manifest = {**json.loads(text), "image_backbone": "efficientnet-lite1"}
    with conn:  # as if the store's codes had been made with Lite1
        conn.execute("UPDATE meta SET value = ? WHERE key = 'manifest'", (json.dumps(manifest),))
    conn.close()
    store = Store.open(served)  # holds the store's exclusive flock, as `cmh serve` does
    try:
        assert len(read_items(served, max_items=100, seed=0).items) == 30
    finally:
        store.close()
    asked: list[str] = []

    def stop(paths: object, cache: object, *, backbone: str, **kwargs: object) -> None:
        asked.append(backbone)
        raise InputError("stopped before the backbone")

    monkeypatch.setattr("models.features.pipeline.features_by_content", stop)
    assert main(from_store(served, tmp_path / "b.pt")) == 2
    assert main([*from_store(served, tmp_path / "b.pt"), "--backbone", "efficientnet-lite2"]) == 2
    assert asked == ["efficientnet-lite1", "efficientnet-lite2"]


def test_features_are_computed_once_per_image_content(tmp_path: Path) -> None:
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "copy-of-a", "c")]
    photo(1, "red").save(paths[0])
    photo(2, "blue").save(paths[1])
    shutil.copy(paths[0], paths[2])
    photo(3, "green").save(paths[3])
    cache = FeatureCache(tmp_path / "cache")
    first = features_by_content(paths[:3], cache, backbone="efficientnet-lite0")
    assert (first.encoded, first.cached) == (2, 0)
    assert np.array_equal(first.features[0], first.features[2])
    assert not np.array_equal(first.features[0], first.features[1])
    again = features_by_content(paths, cache, backbone="efficientnet-lite0")
    assert (again.encoded, again.cached) == (1, 2)  # only c is new
    assert np.array_equal(again.features[:3], first.features) and len(cache) == 3
    cache.close()


def test_a_cache_of_another_width_is_refused_in_one_line(tmp_path: Path) -> None:
    photo(1, "red").save(tmp_path / "a.png")
    cache = FeatureCache(tmp_path / "cache")
    cache.put("efficientnet-lite0", ["0" * 64], np.ones((1, 4), dtype=np.float32))
    with pytest.raises(InputError, match="expected 1280-d features of efficientnet-lite0 in .*4-d"):
        features_by_content([tmp_path / "a.png"], cache, backbone="efficientnet-lite0")
    cache.close()


def test_the_feature_cache_keeps_the_most_recently_used_within_its_bound(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, max_bytes=2 * 16)  # two 4-d float32 vectors
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.put("b", ["x", "y", "z"], vectors)
    assert cache.size_bytes() == 48
    cache.get("b", ["x"], 4)  # x is used again, after y and z were written
    assert cache.evict() == 1
    kept = cache.get("b", ["x", "y", "z"], 4)
    assert sorted(kept) == ["x", "z"] and np.array_equal(kept["x"], vectors[0])
    assert cache.get("other-backbone", ["x"], 4) == {}
    cache.close()


def test_labels_in_fields_give_labelled_validation(
    served: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    items = []
    for i in range(12):
        colour = list(COLOURS)[i % len(COLOURS)]
        path = tmp_path / f"{i}.png"
        photo(100 + i, colour).save(path)
        encoded = base64.b64encode(path.read_bytes()).decode()
        fields = {"labels": [colour, "labelled"]}
        items.append(
            {"id": f"l{i}", "text": f"a {colour} disc", "image_base64": encoded, "fields": fields}
        )
    with TestClient(create_app(Settings(artifacts_dir=served))) as client:
        job = client.post("/v1/index/build", json={"items": items})
        assert job.status_code == 202, job.text
        assert wait_for_job(client, job.json()["job_id"])["status"] == "succeeded"
    data = stored_dataset(served)
    assert data.label_names == ["blue", "green", "labelled", "red"]
    row = data.ids.index("l0")  # red
    assert (
        data.labels[row].tolist() == [0, 0, 1, 1] and data.labels[data.ids.index("p0")].sum() == 0
    )
    seen: list[PairDataset] = []
    real = compare.train_row

    def spy(data: PairDataset, *args: Any, **kwargs: Any) -> Trained:
        seen.append(data)
        return real(data, *args, **kwargs)

    monkeypatch.setattr("cli.train.train_row", spy)
    capsys.readouterr()
    assert main(from_store(served, tmp_path / "l.pt")) == 0
    out = capsys.readouterr().out
    assert "42 items" in out and "4 labels" in out
    assert seen[0].labels.shape == (42, 4) and seen[0].labels.sum() == 24


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("absent", "expected a store at"),
        ("empty", "expected items in the store at"),
        ("few", "expected --max-items of at least 10, got 5"),
        ("both", "expected --from-store ARTIFACTS or --dataset/--root, got both"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    case: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts = tmp_path / "artifacts"
    argv = from_store(artifacts, tmp_path / "x.pt")
    if case == "empty":
        Store.create(artifacts, store_manifest(16)).close()
    if case == "few":
        argv += ["--max-items", "5"]
    if case == "both":
        argv += ["--dataset", "pairs", "--root", str(tmp_path)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.pt").exists()


def test_stored_pairs_leave_out_items_whose_image_is_gone(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for name in ("a", "b"):
        photo(0, "red").save(tmp_path / "images" / f"{name}.png")
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / "images" / "a.png").read_bytes())
    data = stored_pairs(
        tmp_path,
        ids=[1, "two", 3, 4],
        texts=["a red disc", "a red ball", "gone", "outside"],
        images=["images/a.png", "images/b.png", "images/deleted.png", "../outside.png"],
        fields=[{"labels": "red"}, {"labels": [3]}, {}, {}],
        n_live=4,
    )
    assert data.ids == ["1", "two"] and data.texts == ["a red disc", "a red ball"]
    assert [r.reason.split(":")[0] for r in data.rejected] == [
        "missing image file",
        f"image outside {tmp_path.resolve()}",
    ]
    assert data.label_names == ["red"] and data.labels.tolist() == [[1], [0]]
    assert [d.pair for d in data.defects] == ["item 'two'"]  # labels not names: loaded without
    assert data.train_idx.tolist() == data.database_idx.tolist() == [0, 1]
    assert data.query_idx.size == 0


def test_a_labelled_pairs_file_built_into_a_store_keeps_its_labels(tmp_path: Path) -> None:
    root, artifacts = tmp_path / "pairs", tmp_path / "artifacts"
    write_pairs(root, 12, new_words=False)
    lines = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]
    for record in lines:  # labelled by colour, as a user's pairs file may be
        record["labels"] = [record["text"].split()[1]]
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    train = ["train", "--dataset", "pairs", "--root", str(root), "--cache-dir", str(tmp_path)]
    assert main([*train, "--out", str(artifacts / "model.pt"), *FAST]) == 0
    build = ["index", "build", "--artifacts", str(artifacts), "--dataset", "pairs"]
    assert main([*build, "--root", str(root), "--device", "cpu"]) == 0
    data = stored_dataset(artifacts)
    assert data.label_names == ["blue", "green", "red"]  # a retrain evaluates with them
    assert read_items(artifacts, max_items=100, seed=0).items[0].fields == {
        "labels": ["red"],
        "place": "desk",
    }
