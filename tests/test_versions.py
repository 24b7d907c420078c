"""Versions of an artifacts folder: reindex beside the served store, switch, roll back, prune
(store/versions.py, service/reindex.py, service/serving.py), through the real command line and
the real app; the served process and kill -9 tests are in tests/test_versions_live.py."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from cli.main import main
from common.errors import InputError, StoreRetired
from models.features import content_cache
from service.app import create_app
from service.settings import Settings
from store import versions
from store.rows import NewItems
from store.snapshot import read_items
from store.store import Store
from tests.helpers import wait_for_job
from tests.test_train_from_store import FAST, NEW_WORDS, build_served, photo


def items_of(folder: Path) -> dict[object, tuple[str, str, float, dict[str, object]]]:
    """Every live item of a version's store: id -> (text, image, added, fields)."""
    stored = read_items(folder, max_items=100_000, seed=0).items
    return {i.id: (i.text, i.image, i.added, i.fields) for i in stored}


@pytest.fixture(scope="module")
def retrained_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A served folder (v1: a model that never saw NEW_WORDS, a store of 30 items whose captions
    hold them) and new.pt beside it, trained from that store; read-only."""
    base = tmp_path_factory.mktemp("versions")
    artifacts = build_served(base)
    retrain = ["train", "--from-store", str(artifacts), "--out", str(base / "new.pt"), *FAST]
    assert main(retrain) == 0
    return base


@pytest.fixture
def served(retrained_master: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(a private copy of the served folder, the retrained checkpoint)."""
    artifacts = Path(shutil.copytree(retrained_master / "artifacts", tmp_path / "artifacts"))
    return artifacts, retrained_master / "new.pt"


def reindex(artifacts: Path, model: Path) -> None:
    args = ["index", "reindex", "--artifacts", str(artifacts), "--model", str(model)]
    assert main([*args, "--device", "cpu", "--nice", "0"]) == 0  # this process: not lowered


def upload(i: int, colour: str, text: str) -> dict[str, object]:
    buf = io.BytesIO()
    photo(i, colour).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    return {"id": f"n{i}", "text": text, "image_base64": image, "fields": {"i": i}}


def test_reindex_copies_every_item_with_the_new_models_codes(
    served: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts, model = served
    capsys.readouterr()
    reindex(artifacts, model)
    out = capsys.readouterr().out
    assert "built version v2" in out and "30 items" in out
    v2 = artifacts / "versions" / "v2"
    assert items_of(v2) == items_of(artifacts)  # ids, captions, images, added times, fields
    for _, image, _, _ in items_of(v2).values():  # hard links: no second copy of an image
        assert os.path.samefile(v2 / image, artifacts / image)
    assert [(v.name, v.current, v.state) for v in versions.versions(artifacts)] == [
        ("v1", True, "ready"),
        ("v2", False, "ready"),
    ]
    assert versions.current_name(artifacts) == "v1"  # built, not switched
    store = Store.open(v2)
    assert store.manifest.vocabulary_sha256 != Store.open(artifacts).manifest.vocabulary_sha256
    store.close()
    # Run again on a ready version: a new version, not a change to the ready one.
    assert main(["index", "versions", "--artifacts", str(artifacts)]) == 0
    assert "* v1" in capsys.readouterr().out


def test_switch_carries_over_writes_made_since_and_rollback_carries_them_back(
    served: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts, model = served
    reindex(artifacts, model)
    # Writes to the served v1 after the reindex: an add, a replace, a delete.
    v1 = Store.open(artifacts)
    before = v1.manifest
    enc_words = (before.n_bits + 63) // 64
    zeros = torch.zeros((1, enc_words), dtype=torch.int64).numpy().astype("uint64")
    buf = io.BytesIO()
    photo(99, "red").save(buf, format="PNG")
    v1.add(
        NewItems(["late"], ["a crimson kite"], [""], zeros, zeros, [{"k": 1}],
                 image_data=[(buf.getvalue(), "png")]),
    )  # fmt: skip
    v1.add(
        NewItems(["p3"], ["a blue azure disc replaced"], [""], zeros, zeros, [{}],
                 image_data=[(buf.getvalue(), "png")]),
        on_conflict="replace",
    )  # fmt: skip
    assert v1.delete(["p4"]).ids == ["p4"]
    v1.close()
    capsys.readouterr()
    assert main(["index", "switch", "--artifacts", str(artifacts), "--device", "cpu"]) == 0
    assert "now serving v2" in capsys.readouterr().out
    v2 = artifacts / "versions" / "v2"
    assert items_of(v2) == items_of(artifacts) and "late" in items_of(v2)
    assert "p4" not in items_of(v2) and items_of(v2)["p3"][0] == "a blue azure disc replaced"
    assert versions.current_name(artifacts) == "v2"
    old = Store.open(artifacts)  # retired: reads, refuses writes
    assert old.retired
    with pytest.raises(StoreRetired):
        old.delete(["p5"])
    old.close()
    # Served now: the new words are known; a write lands in v2; roll back carries it to v1.
    with TestClient(create_app(Settings(artifacts_dir=artifacts, device="cpu"))) as client:
        stats = client.get("/v1/index/stats").json()
        assert stats["version"] == "v2" and stats["items"] == 30
        assert [v["name"] for v in stats["versions"]] == ["v1", "v2"]
        assert all(v["disk_bytes"] > 0 for v in stats["versions"])
        hits = client.post("/v1/search/text", json={"text": NEW_WORDS["red"], "k": 3}).json()
        assert not hits["no_known_words"] and len(hits["hits"]) == 3
        job = client.post("/v1/index/build", json={"items": [upload(7, "green", "an emerald")]})
        assert wait_for_job(client, job.json()["job_id"])["status"] == "succeeded"
        assert client.delete("/v1/items/p5").status_code == 200
    assert main(["index", "rollback", "--artifacts", str(artifacts), "--device", "cpu"]) == 0
    assert versions.current_name(artifacts) == "v1"
    assert items_of(artifacts) == items_of(v2) and "n7" in items_of(artifacts)
    assert "p5" not in items_of(artifacts)
    # Prune: the served version stays; v2 goes, its images stay where v1 links them.
    assert main(["index", "prune", "--artifacts", str(artifacts), "--version", "v1"]) == 2
    assert main(["index", "prune", "--artifacts", str(artifacts), "--all-old"]) == 0
    assert not v2.exists() and [v.name for v in versions.versions(artifacts)] == ["v1"]
    for _, image, _, _ in items_of(artifacts).values():
        assert (artifacts / image).is_file()


def test_the_server_switches_while_serving_and_writes_follow(served: tuple[Path, Path]) -> None:
    artifacts, model = served
    settings = Settings(artifacts_dir=artifacts, device="cpu", api_key="k")
    key = {"X-API-Key": "k"}
    with TestClient(create_app(settings)) as client:
        reindex(artifacts, model)  # beside the served store, which the app holds open
        job = client.post(
            "/v1/index/build", json={"items": [upload(1, "red", "a crimson one")]}, headers=key
        )
        assert wait_for_job(client, job.json()["job_id"])["status"] == "succeeded"
        assert client.delete("/v1/items/p2", headers=key).status_code == 200
        before = client.post("/v1/search/text", json={"text": "crimson"}).json()
        assert before["no_known_words"]  # v1's model never saw the word
        assert client.post("/v1/admin/reload").status_code == 401
        answer = client.post("/v1/admin/reload", headers=key)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["version"], body["previous"]) == ("v2", "v1")
        assert body["caught_up"]["copied"] == 1 and body["caught_up"]["deleted"] == 1
        after = client.post("/v1/search/text", json={"text": "crimson"}).json()
        assert not after["no_known_words"]
        assert client.get("/v1/items/n1/image").status_code == 200  # the write made before
        assert client.get("/v1/items/p2/image").status_code == 404  # and the delete
        stats = client.get("/v1/index/stats").json()
        assert stats["version"] == "v2" and stats["items"] == 30
        again = client.post("/v1/admin/reload", headers=key)
        assert again.status_code == 409 and "newer than the served v2" in again.json()["detail"]
        back = client.post("/v1/admin/reload", json={"version": "v1"}, headers=key)
        assert back.status_code == 200 and back.json()["version"] == "v1"
        assert client.post("/v1/search/text", json={"text": "crimson"}).json()["no_known_words"]
        wrong = client.post("/v1/admin/reload", json={"version": "v9"}, headers=key)
        assert wrong.status_code == 409 and "v1, v2" in wrong.json()["detail"]
        bad = client.post("/v1/admin/reload", json={"version": "../v1"}, headers=key)
        assert bad.status_code == 422


def test_what_is_refused_says_why_in_one_line(
    served: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts, model = served
    switch = ["index", "switch", "--artifacts", str(artifacts), "--device", "cpu"]
    assert main(switch) == 2
    assert "expected a ready version newer than the served v1" in capsys.readouterr().err
    assert main(["index", "rollback", "--artifacts", str(artifacts)]) == 2
    assert "expected a ready version before the served v1" in capsys.readouterr().err
    reindex(artifacts, model)
    held = Store.open(artifacts / "versions" / "v2")  # as a server still answering on it would
    try:
        assert main(["index", "prune", "--artifacts", str(artifacts), "--version", "v2"]) == 2
        assert "a process has its store open" in capsys.readouterr().err
    finally:
        held.close()
    (artifacts / "CURRENT").write_text("../../etc\n")
    assert main(["serve", "--artifacts", str(artifacts)]) == 2
    err = capsys.readouterr().err
    assert "expected a version name like v2, got '../../etc'" in err and "Traceback" not in err
    (artifacts / "CURRENT").write_text("v7\n")
    assert main(["serve", "--artifacts", str(artifacts)]) == 2
    assert "versions/v7/model.pt" in capsys.readouterr().err
    # The retired store is not what decides: CURRENT names the served version.
    versions.set_current(artifacts, "v2")
    assert main(["index", "prune", "--artifacts", str(artifacts), "--version", "v1"]) == 0
    assert not (artifacts / "model.pt").exists() and (artifacts / "versions" / "v2").is_dir()
    v2 = artifacts / "versions" / "v2"
    assert all((v2 / image).is_file() for _, image, _, _ in items_of(v2).values())


def test_a_switch_killed_between_retiring_and_current_leaves_a_store_that_takes_writes(
    served: tuple[Path, Path],
) -> None:
    artifacts, model = served
    reindex(artifacts, model)
    store = Store.open(artifacts)
    with store.switching() as retire:  # what a switch does, up to the instant before CURRENT
        retire(True)
    store.close()
    assert versions.current_name(artifacts) == "v1"
    with TestClient(create_app(Settings(artifacts_dir=artifacts, device="cpu"))) as client:
        assert client.delete("/v1/items/p1").status_code == 200
    store = Store.open(artifacts)
    assert not store.retired
    store.close()


def test_a_request_in_flight_keeps_its_version_until_it_ends(served: tuple[Path, Path]) -> None:
    artifacts, model = served
    reindex(artifacts, model)
    with TestClient(create_app(Settings(artifacts_dir=artifacts, device="cpu"))) as client:
        serving = client.app.state.serving  # type: ignore[attr-defined]
        held = serving.enter()  # as a request that began before the switch
        assert held.version == "v1"
        assert client.post("/v1/admin/reload").json()["version"] == "v2"
        assert serving.current().version == "v2"
        # The request still reads its own version, model and store: never a mix of the two.
        words = held.encoder.read_query("crimson")
        assert not words.used  # v1's vocabulary
        assert held.store.view().count == 30 and held.store.retired
        assert serving.current().encoder.read_query("crimson").used
        with pytest.raises(InputError, match="a process has its store open"):
            versions.remove(artifacts, "v1")  # while the request holds it
        serving.leave(held)  # its end: v1 is closed (off the caller's thread), so prunable
        for closing in serving._closing:
            closing.join(timeout=30)
        assert versions.remove(artifacts, "v1") > 0
        assert client.get("/v1/index/stats").json()["version"] == "v2"


def test_a_reindex_over_a_cold_feature_cache_reuses_its_loaded_backbone(
    served: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    artifacts, model = served
    shutil.rmtree(artifacts / "feature-cache")  # every image is new to the cache
    loads: list[str] = []
    real_load = content_cache.load_backbone

    def counted(name: str, **kwargs: object) -> object:
        loads.append(name)
        return real_load(name, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(content_cache, "load_backbone", counted)
    args = ["index", "reindex", "--artifacts", str(artifacts), "--model", str(model)]
    assert main([*args, "--device", "cpu", "--nice", "0", "--batch", "4"]) == 0
    assert loads == []  # 8 batches of new images, each encoded by the reindex's own backbone
    assert items_of(artifacts / "versions" / "v2") == items_of(artifacts)
    assert len(list((artifacts / "feature-cache").iterdir())) > 0
