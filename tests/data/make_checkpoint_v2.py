"""Write a tiny version-2 checkpoint (before text weighting) and the packed codes it gives.

Run it inside an export of a commit that writes version 2, never on today's tree:

    mkdir /tmp/v2 && git archive 103dd24 | tar -x -C /tmp/v2
    (cd /tmp/v2 && PYTHONPATH=. python $REPO/tests/data/make_checkpoint_v2.py \
        $REPO/tests/data/checkpoint-v2)

It writes NAME.pt and NAME.json: the fixed inputs and the packed codes that commit's model gives
for them, which tests/test_checkpoint.py checks today's loader reproduces (binary text).
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
    text = (rng.random((64, TEXT_DIM)) < 0.4).astype(np.float32)  # binary, as v2 text was
    cfg = TrainConfig(n_bits=16, image_hidden=(8,), text_hidden=(4, 4), k=3, epochs=2)
    torch.manual_seed(3)
    model = HashingModel(
        image_dim=IMAGE_DIM, text_dim=TEXT_DIM, n_bits=cfg.n_bits, image_hidden=cfg.image_hidden,
        text_hidden=cfg.text_hidden, input_norm=cfg.input_norm, dropout=cfg.dropout,
    )  # fmt: skip
    model.fit_statistics(image, text)
    model.eval()
    history = [{"epoch": 1.0, "loss": 0.5, "val_i2t": 0.25, "val_t2i": 0.5}]
    save_checkpoint(
        stem.with_suffix(".pt"), model=model, train_config=dataclasses.asdict(cfg),
        history=history, vocabulary=["cat", "dog", "red", "sky", "car"],
        image_backbone="synthetic", dataset="synthetic",
    )  # fmt: skip
    image_in, text_in = image[:N_ROWS], text[:N_ROWS]
    expected = {
        "image": image_in.tolist(),
        "text": text_in.tolist(),
        "image_codes": pack_codes(model.encode_image(image_in)).tolist(),
        "text_codes": pack_codes(model.encode_text(text_in)).tolist(),
    }
    stem.with_suffix(".json").write_text(json.dumps(expected, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
