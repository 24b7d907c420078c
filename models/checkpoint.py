"""AUCMH checkpoints: one torch file with weights, config, history, vocabulary and statistics.

The file is a plain dict of tensors, strings and numbers, so `torch.load(weights_only=True)`
reads it and nothing else is needed to rebuild the model (nanoGPT's `model_args` idea).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import InputError
from models.aucmh import HashingModel
from models.train import TrainConfig, build_model, config_from_dict

FORMAT = "cmh-aucmh-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and everything saved with it."""

    model: HashingModel
    cfg: TrainConfig
    history: list[dict[str, float]]
    vocabulary: list[str] | None  # BoW terms in text feature column order, when the text is BoW
    image_backbone: str  # what made the image features the model expects
    dataset: str  # the dataset it was trained on
    n_bits: int


def save_checkpoint(
    path: Path,
    *,
    model: HashingModel,
    cfg: TrainConfig,
    history: list[dict[str, float]],
    vocabulary: list[str] | None,
    image_backbone: str,
    dataset: str,
) -> None:
    """Write the checkpoint atomically (temp file in the same folder, fsync, os.replace)."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": dataclasses.asdict(cfg),
        "n_bits": model.n_bits,
        "image_dim": model.image_dim,
        "text_dim": model.text_dim,
        "history": [{str(k): float(v) for k, v in row.items()} for row in history],
        "vocabulary": list(vocabulary) if vocabulary is not None else None,
        "image_backbone": image_backbone,
        "dataset": dataset,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _field(payload: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in payload or not isinstance(payload[key], kind):
        raise InputError(f"expected a '{key}' entry in checkpoint {path}, got {payload.get(key)!r}")
    return payload[key]


def load_checkpoint(path: Path, *, device: str = "cpu") -> Checkpoint:
    """Read a checkpoint written by save_checkpoint onto `device`; the model is in eval mode.

    Raises InputError when the file is missing, is not such a checkpoint, or is inconsistent.
    """
    if not path.is_file():
        raise InputError(f"expected a checkpoint file, got no file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        # torch.load raises these for a foreign, torn or non-weights-only file; its own message
        # suggests weights_only=False, which we never do, so only the error kind is quoted.
        msg = f"expected an AUCMH checkpoint at {path}, got unreadable data ({type(err).__name__})"
        raise InputError(msg) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"expected an AUCMH checkpoint at {path}, got another kind of file")
    if payload.get("version") != VERSION:
        raise InputError(
            f"expected checkpoint version {VERSION} at {path}, got {payload.get('version')!r}"
        )
    cfg = config_from_dict(_field(payload, "config", dict, path))
    n_bits = _field(payload, "n_bits", int, path)
    if n_bits != cfg.n_bits:
        raise InputError(f"expected n_bits {cfg.n_bits} as in the config of {path}, got {n_bits}")
    vocabulary = payload.get("vocabulary")
    if vocabulary is not None and not (
        isinstance(vocabulary, list) and all(isinstance(t, str) for t in vocabulary)
    ):
        raise InputError(f"expected a list of strings as vocabulary in {path}, got {vocabulary!r}")
    model = build_model(
        cfg,
        image_dim=_field(payload, "image_dim", int, path),
        text_dim=_field(payload, "text_dim", int, path),
    )
    try:
        model.load_state_dict(_field(payload, "model", dict, path))
    except RuntimeError as err:
        raise InputError(f"expected weights matching the config in {path}, got: {err}") from err
    model.to(device)
    model.eval()
    return Checkpoint(
        model=model,
        cfg=cfg,
        history=list(_field(payload, "history", list, path)),
        vocabulary=vocabulary,
        image_backbone=_field(payload, "image_backbone", str, path),
        dataset=_field(payload, "dataset", str, path),
        n_bits=n_bits,
    )
