"""Checkpoints round-trip to identical codes, old versions keep loading, anything else is refused."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import InputError
from indexes.codes import pack_codes
from models.network.aucmh import ModelConfig
from models.network.checkpoint import load_checkpoint, save_checkpoint
from models.training.train import TrainConfig, config_from_dict, train
from tests.helpers import separable_pairs

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parents[1]

CFG = TrainConfig(
    n_bits=32, image_hidden=(48, 16), text_hidden=(32,), n_anchors=100, batch_size=64, epochs=2,
    n_val=50, seed=1, device="cpu",
)  # fmt: skip


def test_round_trip_gives_identical_codes(tmp_path: Path) -> None:
    data = separable_pairs(n=300)
    model, history = train(cfg=CFG, data=data)
    path = tmp_path / "sub" / "aucmh-32.pt"
    save_checkpoint(
        path, model=model, train_config=dataclasses.asdict(CFG), history=history,
        vocabulary=["cat", "dog"], image_backbone="synthetic", dataset=data.name,
    )  # fmt: skip
    assert [p.name for p in path.parent.iterdir()] == ["aucmh-32.pt"]  # no temp file left
    ckpt = load_checkpoint(path)
    assert ckpt.model_config == CFG.model_config(image_dim=40, text_dim=25)
    assert config_from_dict(ckpt.train_config) == CFG
    assert ckpt.n_bits == 32 and ckpt.history == history
    assert ckpt.vocabulary == ["cat", "dog"] and ckpt.image_backbone == "synthetic"
    assert ckpt.dataset == "synthetic" and not ckpt.model.training
    assert ckpt.text_weighting == "binary" and ckpt.idf is None  # the default
    assert data.image_features is not None and data.text_features is not None
    for encode_a, encode_b, x in [
        (model.encode_image, ckpt.model.encode_image, data.image_features),
        (model.encode_text, ckpt.model.encode_text, data.text_features),
    ]:
        assert np.array_equal(encode_a(x), encode_b(x))
    # The standardisation statistics travel with the weights.
    assert torch.equal(ckpt.model.image_mean, model.image_mean.cpu())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="expected a checkpoint file, got no file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="got unreadable data"):
        load_checkpoint(path)


def test_foreign_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(InputError, match="got another kind of file"):
        load_checkpoint(path)


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickle.pt"
    torch.save({"format": Path("x")}, path)  # loading it needs arbitrary unpickling
    with pytest.raises(InputError, match="got unreadable data"):
        load_checkpoint(path)


def test_the_file_keeps_the_network_apart_from_the_training_record(tmp_path: Path) -> None:
    data = separable_pairs(n=300)
    model, history = train(cfg=CFG, data=data)
    path = tmp_path / "a.pt"
    save_checkpoint(
        path, model=model, train_config=dataclasses.asdict(CFG), history=history,
        vocabulary=None, image_backbone="synthetic", dataset=data.name,
    )  # fmt: skip
    payload = torch.load(path, weights_only=True)
    assert payload["version"] == 4 and "config" not in payload
    # nanoGPT's pattern: the model module alone rebuilds the network from "model_args".
    assert ModelConfig(**payload["model_args"]) == model.config
    assert payload["train_config"] == dataclasses.asdict(CFG)


@pytest.mark.parametrize("module", ["models.network.checkpoint", "service.app"])
def test_serving_imports_no_training(module: str) -> None:
    # The checkpoint loader and the whole served app stop at models.network: neither training
    # nor the baselines come in with them.
    code = (
        f"import sys, {module}; "
        "bad = [m for m in sys.modules if m.startswith(('models.training', 'models.methods'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize(
    ("name", "input_norm", "dropout"),
    [
        ("checkpoint-v1", "l2", 0.3),  # version 1 as written at 5dfba2a
        ("checkpoint-v1-no-norm", "zscore", 0.0),  # before input_norm and dropout (e94b8ca^)
    ],
)
def test_version_1_checkpoints_rebuild_their_network_and_codes(
    name: str, input_norm: str, dropout: float
) -> None:
    # Saved by tests/data/make_checkpoint_v1.py with the code of the commit named above; the
    # JSON holds the packed codes that code gave for a few fixed inputs.
    expected = json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))
    ckpt = load_checkpoint(DATA / f"{name}.pt")
    assert ckpt.model_config == ModelConfig(
        image_dim=6, text_dim=5, n_bits=16, image_hidden=(8,), text_hidden=(4, 4),
        input_norm=input_norm, dropout=dropout,
    )  # fmt: skip
    assert not ckpt.model.training and ckpt.vocabulary == ["cat", "dog"]
    assert ckpt.text_weighting == "binary" and ckpt.idf is None  # before text weighting
    # The training record is the saved config, completed with the network it rebuilt.
    record = {**expected["config"], "image_hidden": (8,), "text_hidden": (4, 4)}
    assert ckpt.train_config == {**record, "input_norm": input_norm, "dropout": dropout}
    image = np.asarray(expected["image"], dtype=np.float32)
    text = np.asarray(expected["text"], dtype=np.float32)
    assert pack_codes(ckpt.model.encode_image(image)).tolist() == expected["image_codes"]
    assert pack_codes(ckpt.model.encode_text(text)).tolist() == expected["text_codes"]


def test_version_2_checkpoints_load_as_binary_text() -> None:
    # Saved by tests/data/make_checkpoint_v2.py at 103dd24, before text weighting existed.
    expected = json.loads((DATA / "checkpoint-v2.json").read_text(encoding="utf-8"))
    assert torch.load(DATA / "checkpoint-v2.pt", weights_only=True)["version"] == 2
    ckpt = load_checkpoint(DATA / "checkpoint-v2.pt")
    assert ckpt.text_weighting == "binary" and ckpt.idf is None
    assert ckpt.vocabulary == ["cat", "dog", "red", "sky", "car"]
    image = np.asarray(expected["image"], dtype=np.float32)
    text = np.asarray(expected["text"], dtype=np.float32)
    assert pack_codes(ckpt.model.encode_image(image)).tolist() == expected["image_codes"]
    assert pack_codes(ckpt.model.encode_text(text)).tolist() == expected["text_codes"]


def test_unknown_version_is_refused(tmp_path: Path) -> None:
    payload = torch.load(DATA / "checkpoint-v1.pt", weights_only=True)
    payload["version"] = 5
    path = tmp_path / "v5.pt"
    torch.save(payload, path)
    with pytest.raises(InputError, match=r"expected checkpoint version in \(1, 2, 3, 4\) .*got 5"):
        load_checkpoint(path)


def test_version_1_with_a_config_that_disagrees_with_its_weights_is_refused(
    tmp_path: Path,
) -> None:
    payload = torch.load(DATA / "checkpoint-v1-no-norm.pt", weights_only=True)
    payload["config"]["dropout"] = 0.3  # dropout layers shift the layer indices of the weights
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(InputError, match="expected weights matching the config"):
        load_checkpoint(path)
