"""Checkpoints round-trip to identical codes and refuse anything else with a clear InputError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import InputError
from models.checkpoint import load_checkpoint, save_checkpoint
from models.train import TrainConfig, train
from tests.test_train import separable_pairs

CFG = TrainConfig(
    n_bits=32, image_hidden=(48, 16), text_hidden=(32,), n_anchors=100, batch_size=64, epochs=2,
    n_val=50, seed=1, device="cpu",
)  # fmt: skip


def test_round_trip_gives_identical_codes(tmp_path: Path) -> None:
    data = separable_pairs(n=300)
    model, history = train(cfg=CFG, data=data)
    path = tmp_path / "sub" / "aucmh-32.pt"
    save_checkpoint(
        path, model=model, cfg=CFG, history=history, vocabulary=["cat", "dog"],
        image_backbone="synthetic", dataset=data.name,
    )  # fmt: skip
    assert [p.name for p in path.parent.iterdir()] == ["aucmh-32.pt"]  # no temp file left
    ckpt = load_checkpoint(path)
    assert ckpt.cfg == CFG and ckpt.n_bits == 32 and ckpt.history == history
    assert ckpt.vocabulary == ["cat", "dog"] and ckpt.image_backbone == "synthetic"
    assert ckpt.dataset == "synthetic" and not ckpt.model.training
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
