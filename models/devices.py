"""Where torch runs: the one reading of a device setting ("auto", "cpu" or "cuda")."""

from __future__ import annotations

import torch

from common.errors import InputError

DEVICES = ("auto", "cpu", "cuda")  # the values a device setting takes


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without CUDA is an InputError."""
    if name not in DEVICES:
        raise InputError(f"expected device auto, cpu or cuda, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("expected a CUDA device for device 'cuda', got none available")
    return torch.device(name)
