"""AUCMH checkpoints: one torch file with the network's config, weights, history and text encoding.

The file is a plain dict of tensors, strings and numbers, so `torch.load(weights_only=True)`
reads it, and the network is rebuilt from its "model_args" with models/network/aucmh.py alone
(nanoGPT's `GPTConfig(**checkpoint["model_args"])`): serving never imports training.

Version 4 (written): "model_args" (ModelConfig fields), "model" (state dict), "train_config"
(the TrainConfig fields it was trained with, for the record), "history", "vocabulary",
"text_weighting" ("binary", "log" or "tfidf": models/features/text.py), "idf" (a (text_dim,)
float64 tensor for "tfidf", else None), "text_tokens" ("words" or "search": how Chinese text was
cut into the vocabulary's words), "image_backbone", "dataset". Version 3 (read): the same without
"text_tokens" (accurate-mode words, the only kind then; the number changed so that version-3
code refuses a search-mode checkpoint instead of cutting its queries otherwise). Version 2: the same
without "text_weighting" and "idf": binary text, the only kind then. Its number changed so that
code reading version 2 refuses a tf-idf checkpoint instead of serving it binary inputs. Version 1
(read): one "config" dict of TrainConfig fields, network and training mixed, with "n_bits",
"image_dim" and "text_dim" beside it; binary text.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import InputError
from common.fsio import atomic_write
from models.features.text import DEFAULT_TOKENS, check_tokens, check_weighting
from models.network.aucmh import HashingModel, ModelConfig, build_model

FORMAT = "cmh-aucmh-checkpoint"
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)

# The ModelConfig fields a version-1 "config" holds (the feature widths sit beside it).
V1_NETWORK_FIELDS = ("n_bits", "image_hidden", "text_hidden", "input_norm", "dropout")
# Network fields added after version-1 checkpoints were first written, with the value those
# checkpoints were trained with: such a checkpoint rebuilds its own network, not today's default.
V1_ABSENT_NETWORK_FIELDS: dict[str, Any] = {"input_norm": "zscore", "dropout": 0.0}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and everything saved with it."""

    model: HashingModel  # in eval mode, on the device asked for
    model_config: ModelConfig  # what the network is (model.config)
    train_config: dict[str, Any]  # TrainConfig fields it was trained with, as saved (a record)
    history: list[dict[str, float]]  # one row per trained epoch (models/training/train.py)
    vocabulary: list[str] | None  # BoW terms in text feature column order, when the text is BoW
    text_weighting: str  # a word's value in a text: "binary", "log" or "tfidf" (features/text.py)
    idf: np.ndarray | None  # (text_dim,) float64 for "tfidf" (from the training texts), else None
    text_tokens: str  # how Chinese text is cut into words: "words" or "search" (features/text.py)
    image_backbone: str  # what made the image features the model expects
    dataset: str  # the dataset it was trained on

    @property
    def n_bits(self) -> int:
        """The code length of the network."""
        return self.model_config.n_bits


def save_checkpoint(
    path: Path,
    *,
    model: HashingModel,
    train_config: dict[str, Any],
    history: list[dict[str, float]],
    vocabulary: list[str] | None,
    image_backbone: str,
    dataset: str,
    text_weighting: str = "binary",
    idf: np.ndarray | None = None,
    text_tokens: str = DEFAULT_TOKENS,
) -> None:
    """Write the checkpoint atomically and durably (common.fsio.atomic_write).

    `train_config` is `dataclasses.asdict` of the TrainConfig, kept for the record only;
    `text_weighting` and `idf` are the vectorizer's (TextVectorizer.weighting, .idf) that made
    the text features, `text_tokens` its tokens. Raises InputError when they do not fit the
    vocabulary.
    """
    _check_text(text_weighting, idf, vocabulary, model.config.text_dim, "the checkpoint to save")
    check_tokens(text_tokens)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model_args": dataclasses.asdict(model.config),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "train_config": dict(train_config),
        "history": [{str(k): float(v) for k, v in row.items()} for row in history],
        "vocabulary": list(vocabulary) if vocabulary is not None else None,
        "text_weighting": text_weighting,
        "idf": None if idf is None else torch.tensor(np.asarray(idf, dtype=np.float64)),
        "text_tokens": text_tokens,
        "image_backbone": image_backbone,
        "dataset": dataset,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def _field(payload: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in payload or not isinstance(payload[key], kind):
        raise InputError(f"expected a '{key}' entry in checkpoint {path}, got {payload.get(key)!r}")
    return payload[key]


def _check_text(
    weighting: str, idf: np.ndarray | None, vocabulary: list[str] | None, text_dim: int, where: str
) -> None:
    """Raises InputError unless the text weighting and idf fit the vocabulary and network."""
    try:
        check_weighting(weighting, idf, text_dim)
    except InputError as err:
        raise InputError(f"{err} (in {where})") from None
    if weighting != "binary" and vocabulary is None:
        raise InputError(
            f"expected a vocabulary with text weighting {weighting!r} in {where}, got none"
        )


def _text_entries(payload: dict[str, Any], path: Path) -> tuple[str, np.ndarray | None]:
    """(text weighting, idf) of a version-3 or 4 checkpoint."""
    weighting = _field(payload, "text_weighting", str, path)
    idf = payload.get("idf")
    if idf is None:
        return weighting, None
    if not isinstance(idf, torch.Tensor) or idf.dtype != torch.float64 or idf.ndim != 1:
        raise InputError(f"expected idf as a float64 vector in {path}, got {type(idf).__name__}")
    return weighting, idf.numpy().copy()


def _model_config(values: dict[str, Any], path: Path) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    if set(values) != names:
        raise InputError(
            f"expected model_args with fields {sorted(names)} in {path}, got {sorted(values)}"
        )
    fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return ModelConfig(**fixed)


def _v1_configs(payload: dict[str, Any], path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(the network, the training record) of a version-1 checkpoint."""
    config = {**V1_ABSENT_NETWORK_FIELDS, **_field(payload, "config", dict, path)}
    missing = [name for name in V1_NETWORK_FIELDS if name not in config]
    if missing:
        raise InputError(f"expected the network fields {missing} in the config of {path}, got none")
    n_bits = _field(payload, "n_bits", int, path)
    if n_bits != config["n_bits"]:
        raise InputError(
            f"expected n_bits {config['n_bits']} as in the config of {path}, got {n_bits}"
        )
    network = {name: config[name] for name in V1_NETWORK_FIELDS}
    values = {
        "image_dim": _field(payload, "image_dim", int, path),
        "text_dim": _field(payload, "text_dim", int, path),
        **network,
    }
    return _model_config(values, path), config


def load_checkpoint(path: Path, *, device: str = "cpu") -> Checkpoint:
    """Read a checkpoint (version 1, 2, 3 or 4) onto `device`; the model is in eval mode.

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
    version = payload.get("version")
    if version not in READABLE_VERSIONS:
        raise InputError(
            f"expected checkpoint version in {READABLE_VERSIONS} at {path}, got {version!r}"
        )
    if version == 1:
        model_config, train_config = _v1_configs(payload, path)
    else:
        model_config = _model_config(_field(payload, "model_args", dict, path), path)
        train_config = _field(payload, "train_config", dict, path)
    vocabulary = payload.get("vocabulary")
    if vocabulary is not None and not (
        isinstance(vocabulary, list) and all(isinstance(t, str) for t in vocabulary)
    ):
        raise InputError(f"expected a list of strings as vocabulary in {path}, got {vocabulary!r}")
    # Versions 1 and 2 predate text weighting: their text features were binary.
    weighting, idf = _text_entries(payload, path) if version >= 3 else ("binary", None)
    _check_text(weighting, idf, vocabulary, model_config.text_dim, str(path))
    # Versions 1-3 predate search-mode tokens: their vocabularies are accurate-mode words.
    tokens = _field(payload, "text_tokens", str, path) if version >= 4 else DEFAULT_TOKENS
    try:
        check_tokens(tokens)
    except InputError as err:
        raise InputError(f"{err} (in {path})") from None
    model = build_model(model_config)
    try:
        model.load_state_dict(_field(payload, "model", dict, path))
    except RuntimeError as err:
        raise InputError(f"expected weights matching the config in {path}, got: {err}") from err
    model.to(device)
    model.eval()  # once, here: encoding requires it and never switches modes itself
    return Checkpoint(
        model=model,
        model_config=model_config,
        train_config=dict(train_config),
        history=list(_field(payload, "history", list, path)),
        vocabulary=vocabulary,
        text_weighting=weighting,
        idf=idf,
        text_tokens=tokens,
        image_backbone=_field(payload, "image_backbone", str, path),
        dataset=_field(payload, "dataset", str, path),
    )
