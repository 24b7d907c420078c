"""Write a tiny version-1 checkpoint and the packed codes it gives, as old code wrote them.

Version 1 stored one "config" dict of TrainConfig fields (network and training settings mixed).
Run it inside an export of the commit whose format it should record, never on today's tree:

    mkdir /tmp/v1 && git archive 5dfba2a | tar -x -C /tmp/v1  # input_norm, dropout in "config"
    (cd /tmp/v1 && PYTHONPATH=. python $REPO/tests/data/make_checkpoint_v1.py \
        $REPO/tests/data/checkpoint-v1)
    mkdir /tmp/v0 && git archive e94b8ca^ | tar -x -C /tmp/v0  # before they existed
    (cd /tmp/v0 && PYTHONPATH=. python $REPO/tests/data/make_checkpoint_v1.py \
        $REPO/tests/data/checkpoint-v1-no-norm)

It writes NAME.pt and NAME.json: the fixed inputs and the packed codes that commit's model gives
for them, which tests/test_checkpoint.py checks today's loader reproduces.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from indexes.codes import pack_codes
from models.network.aucmh import HashingModel
from models.network.checkpoint import save_checkpoint
from models.training.train import TrainConfig

IMAGE_DIM, TEXT_DIM, N_ROWS = 6, 5, 8


def main() -> None:
    """Build, save and encode one tiny seeded model."""
    stem = Path(sys.argv[1])
    rng = np.random.default_rng(7)
    image = rng.gamma(2.0, size=(64, IMAGE_DIM)).astype(np.float32)
    text = rng.gamma(2.0, size=(64, TEXT_DIM)).astype(np.float32)
    network: dict[str, object] = {}
    if "dropout" in {f.name for f in dataclasses.fields(TrainConfig)}:
        network = {"input_norm": "l2", "dropout": 0.3}  # both change what the network computes
    cfg = TrainConfig(
        n_bits=16, image_hidden=(8,), text_hidden=(4, 4), k=3, epochs=2, device="cpu", **network
    )
    torch.manual_seed(3)
    model = HashingModel(
        image_dim=IMAGE_DIM, text_dim=TEXT_DIM, n_bits=cfg.n_bits,
        image_hidden=cfg.image_hidden, text_hidden=cfg.text_hidden, **network,
    )  # fmt: skip
    model.fit_statistics(image, text)
    model.eval()
    history = [{"epoch": 1.0, "loss": 0.5, "val_i2t": 0.25, "val_t2i": 0.5}]
    save_checkpoint(
        stem.with_suffix(".pt"), model=model, cfg=cfg, history=history, vocabulary=["cat", "dog"],
        image_backbone="synthetic", dataset="synthetic",
    )  # fmt: skip
    image_in, text_in = image[:N_ROWS], text[:N_ROWS]
    expected = {
        "config": dataclasses.asdict(cfg),
        "image": image_in.tolist(),
        "text": text_in.tolist(),
        "image_codes": pack_codes(model.encode_image(image_in)).tolist(),
        "text_codes": pack_codes(model.encode_text(text_in)).tolist(),
    }
    stem.with_suffix(".json").write_text(json.dumps(expected, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
