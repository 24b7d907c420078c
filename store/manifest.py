"""What a store's codes were made with; the served checkpoint must match it."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import InputError
from common.fsio import file_sha256

CHECKED_FIELDS = ("n_bits", "image_backbone", "vocabulary_sha256", "checkpoint_sha256")


@dataclass(frozen=True)
class Manifest:
    """The model that made a store's codes."""

    n_bits: int  # code length
    image_backbone: str  # what made the image features
    vocabulary_sha256: str  # SHA-256 of the vocabulary in column order
    checkpoint_sha256: str  # SHA-256 of the checkpoint file
    created: float  # when the store was made (seconds since the epoch)


def manifest_for(
    checkpoint_path: Path, *, n_bits: int, backbone: str, vocabulary: list[str] | None
) -> Manifest:
    """The manifest of codes made by the checkpoint at checkpoint_path."""
    return Manifest(
        n_bits=n_bits,
        image_backbone=backbone,
        vocabulary_sha256=vocabulary_digest(vocabulary),
        checkpoint_sha256=file_sha256(checkpoint_path),
        created=time.time(),
    )


def check_manifest(found: Manifest, expected: Manifest) -> None:
    """The index must have been made by the served checkpoint: bits, backbone, vocabulary."""
    for field in CHECKED_FIELDS:
        if getattr(found, field) != getattr(expected, field):
            raise InputError(
                f"the index does not match the checkpoint: {field} is {getattr(found, field)!r} "
                f"in the index, {getattr(expected, field)!r} in the checkpoint; rebuild the index"
            )


def vocabulary_digest(vocabulary: list[str] | None) -> str:
    """SHA-256 of the vocabulary in column order (what text codes depend on)."""
    return hashlib.sha256("\n".join(vocabulary or []).encode()).hexdigest()
