"""The AUCMH network: one MLP per modality, each ending in the differentiable hash layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import InputError

# Rows encoded per forward pass in encode_*: bounds memory on large databases.
ENCODE_BATCH = 4096


class _SignSTE(torch.autograd.Function):
    """sign as the paper defines it (+1 for x > 0, else -1) with an identity gradient (STE)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:  # noqa: ARG004
        """Forward: +1 where x > 0, -1 elsewhere (the paper's Eq. 1, unlike torch.sign(0) = 0)."""
        return torch.where(x > 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # noqa: ARG004
        """Backward: d sign(x)/dx := 1, the straight-through estimator."""
        return grad


def hash_layer(z: Tensor, *, binary: bool = True, temperature: float = 1.0) -> Tensor:
    """tanh, L2-normalise, then sign (straight-through) when `binary`; (B, n_bits) -> (B, n_bits).

    With `binary=False` the normalised tanh output is returned: the paper's "without hash layer"
    ablation (continuous relaxation), whose cosines the losses use in place of code cosines.
    `temperature` divides z before tanh (1: the paper's form). sign(tanh(z / T)) = sign(z) for
    every T > 0, so binary codes never depend on it: it only shapes the gradient in training.
    """
    h = F.normalize(torch.tanh(z / temperature), dim=1)
    if not binary:
        return h
    out: Tensor = _SignSTE.apply(h)
    return out


# How raw features are scaled before the MLP: "zscore" standardises every column; "l2" first
# scales each row to unit length, then centres and divides by one scalar RMS, which keeps the
# relative weight of columns (z-scoring blows up rare bag-of-words terms).
INPUT_NORMS = ("zscore", "l2")
BITS = (16, 32, 64, 128)  # the code lengths L a network can have


@dataclass(frozen=True)
class ModelConfig:
    """What the AUCMH network is: everything that shapes its modules or its forward pass.

    A checkpoint stores it as "model_args" and rebuilds the network with build_model alone.
    """

    image_dim: int = 1280  # image feature width (1280: EfficientNet-Lite0, the default backbone)
    text_dim: int = 2000  # text feature width (2000: the default bag-of-words vocabulary)
    n_bits: int = 64  # code length L: 16, 32, 64 or 128
    # Hidden widths of each MLP (its depth); 2048 chosen on Wikipedia and Web News validation.
    image_hidden: tuple[int, ...] = (2048,)
    text_hidden: tuple[int, ...] = (2048,)
    input_norm: str = "zscore"  # feature scaling before the MLPs: one of INPUT_NORMS
    # Dropout after each hidden layer: the paper has none; 0.3 chosen on validation (it lifts
    # image-to-text, where the image MLP otherwise overfits a few thousand pairs).
    dropout: float = 0.3

    def __post_init__(self) -> None:
        checks = [
            (self.image_dim >= 1, "image_dim >= 1", self.image_dim),
            (self.text_dim >= 1, "text_dim >= 1", self.text_dim),
            (self.n_bits in BITS, "n_bits in {16, 32, 64, 128}", self.n_bits),
            (all(w >= 1 for w in self.image_hidden), "positive image_hidden", self.image_hidden),
            (all(w >= 1 for w in self.text_hidden), "positive text_hidden", self.text_hidden),
            (self.input_norm in INPUT_NORMS, f"input_norm in {INPUT_NORMS}", self.input_norm),
            (0.0 <= self.dropout < 1.0, "0 <= dropout < 1", self.dropout),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise InputError(f"expected {expected}, got {got!r}")


def _mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float) -> nn.Sequential:
    """Linear layers with ReLU after every one but the last (paper, section 3.2).

    `dropout` > 0 adds dropout after each hidden ReLU (a regulariser the paper does not use).
    """
    layers: list[nn.Module] = []
    widths = [in_dim, *hidden]
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(widths[-1], out_dim))
    return nn.Sequential(*layers)


class HashingModel(nn.Module):
    """Image and text MLPs with the hash layer, plus the feature statistics used to standardise.

    The arguments are ModelConfig's fields (build_model passes a config's); their defaults here
    are the paper's network (z-scoring, no dropout). Encoding requires eval mode.
    """

    image_mean: Tensor  # (image_dim,) buffers: training-set statistics, saved with the weights
    image_std: Tensor
    text_mean: Tensor  # (text_dim,)
    text_std: Tensor

    def __init__(
        self,
        *,
        image_dim: int,
        text_dim: int,
        n_bits: int,
        image_hidden: Sequence[int],
        text_hidden: Sequence[int],
        input_norm: str = "zscore",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        # Checks every argument (InputError) and is what a checkpoint saves as "model_args".
        self.config = ModelConfig(
            image_dim=image_dim, text_dim=text_dim, n_bits=n_bits, image_hidden=tuple(image_hidden),
            text_hidden=tuple(text_hidden), input_norm=input_norm, dropout=dropout,
        )  # fmt: skip
        self.image_dim = image_dim
        self.text_dim = text_dim
        self.n_bits = n_bits
        self.input_norm = input_norm
        self.image_net = _mlp(image_dim, image_hidden, n_bits, dropout)
        self.text_net = _mlp(text_dim, text_hidden, n_bits, dropout)
        # Buffers, not parameters: saved in the state_dict so a checkpoint encodes on its own.
        self.register_buffer("image_mean", torch.zeros(image_dim))
        self.register_buffer("image_std", torch.ones(image_dim))
        self.register_buffer("text_mean", torch.zeros(text_dim))
        self.register_buffer("text_std", torch.ones(text_dim))

    def fit_statistics(self, image: np.ndarray, text: np.ndarray) -> None:
        """Store the mean and scale of training features (floored to avoid division by 0).

        "zscore": per-column std; "l2": of unit-length rows, one RMS for all columns.
        """
        for prefix, x in (("image", image), ("text", text)):
            t = self._row_scaled(torch.as_tensor(np.asarray(x, dtype=np.float32)))
            mean = t.mean(dim=0)
            if self.input_norm == "zscore":
                std = t.std(dim=0, unbiased=False)
            else:
                std = ((t - mean) ** 2).sum(dim=1).mean().sqrt().expand_as(mean)
            getattr(self, f"{prefix}_mean").copy_(mean)
            getattr(self, f"{prefix}_std").copy_(std.clamp_min(1e-6))

    def _row_scaled(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) if self.input_norm == "l2" else x

    def standardise_image(self, x: Tensor) -> Tensor:
        """(B, image_dim) raw features -> standardised features."""
        return (self._row_scaled(x) - self.image_mean) / self.image_std

    def standardise_text(self, x: Tensor) -> Tensor:
        """(B, text_dim) raw features -> standardised features."""
        return (self._row_scaled(x) - self.text_mean) / self.text_std

    def hash_image(self, x: Tensor, *, binary: bool = True, temperature: float = 1.0) -> Tensor:
        """Raw image features (B, image_dim) -> codes (B, n_bits), differentiable (STE)."""
        z = self.image_net(self.standardise_image(x))
        return hash_layer(z, binary=binary, temperature=temperature)

    def hash_text(self, x: Tensor, *, binary: bool = True, temperature: float = 1.0) -> Tensor:
        """Raw text features (B, text_dim) -> codes (B, n_bits), differentiable (STE)."""
        return hash_layer(
            self.text_net(self.standardise_text(x)), binary=binary, temperature=temperature
        )

    def encode_image(self, features: np.ndarray) -> np.ndarray:
        """Image features (n, image_dim) -> int8 codes (n, n_bits) in {-1, +1}.

        Raises InputError on a wrong shape, RuntimeError in training mode.
        """
        return self._encode(features, self.image_dim, self.hash_image, "image")

    def encode_text(self, features: np.ndarray) -> np.ndarray:
        """Text features (n, text_dim) -> int8 codes (n, n_bits) in {-1, +1}.

        Raises InputError on a wrong shape, RuntimeError in training mode.
        """
        return self._encode(features, self.text_dim, self.hash_text, "text")

    def embed_image(self, features: np.ndarray) -> np.ndarray:
        """Image features (n, image_dim) -> the hash layer's real output (n, n_bits) float32
        (tanh, L2-normalised, before the sign): the query side of asymmetric scoring."""
        return self._encode(features, self.image_dim, self._real_image, "image", np.float32)

    def embed_text(self, features: np.ndarray) -> np.ndarray:
        """Text features (n, text_dim) -> the hash layer's real output (n, n_bits) float32."""
        return self._encode(features, self.text_dim, self._real_text, "text", np.float32)

    def _real_image(self, x: Tensor) -> Tensor:
        return self.hash_image(x, binary=False)

    def _real_text(self, x: Tensor) -> Tensor:
        return self.hash_text(x, binary=False)

    def _encode(
        self,
        features: np.ndarray,
        dim: int,
        fn: Callable[[Tensor], Tensor],
        what: str,
        dtype: type[np.generic] = np.int8,
    ) -> np.ndarray:
        # A read: it never switches the mode (which would race with other threads encoding),
        # it requires eval mode, set once by whoever loaded or trained the model.
        if self.training:
            raise RuntimeError(
                "expected the model in eval mode to encode (call model.eval() once after loading "
                "or training it), got training mode"
            )
        arr = np.asarray(features)
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise InputError(f"expected {what} features of shape (n, {dim}), got {arr.shape}")
        device = self.image_mean.device
        out = np.empty((arr.shape[0], self.n_bits), dtype=dtype)
        with torch.inference_mode():
            for start in range(0, arr.shape[0], ENCODE_BATCH):
                chunk = torch.as_tensor(
                    np.asarray(arr[start : start + ENCODE_BATCH], dtype=np.float32), device=device
                )
                out[start : start + chunk.shape[0]] = fn(chunk).float().cpu().numpy()
        return out


def build_model(config: ModelConfig) -> HashingModel:
    """The untrained network `config` describes (weights from torch's RNG, identity statistics)."""
    return HashingModel(
        image_dim=config.image_dim,
        text_dim=config.text_dim,
        n_bits=config.n_bits,
        image_hidden=config.image_hidden,
        text_hidden=config.text_hidden,
        input_norm=config.input_norm,
        dropout=config.dropout,
    )
