"""A trained AUCMH checkpoint for use: what `cmh train` and the demo build write.

The row's text weighting and tokens travel in the checkpoint, so the service weights and cuts a
query exactly as the model was trained (models/methods/compare.py train_row trains it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from models.data.dataset import PairDataset
from models.features.pipeline import text_vectorizer
from models.network.aucmh import HashingModel
from models.network.checkpoint import save_checkpoint
from models.training.train import TrainConfig


@dataclass(frozen=True)
class Trained:
    """A trained model and its record, and the dataset its text was cut and weighted into."""

    method: str  # the row trained (for a choosing row: the one it chose)
    model: HashingModel
    history: list[dict[str, float]]
    config: TrainConfig  # the kept candidate's
    data: PairDataset  # text features cut and weighted as the model reads them
    score: float  # its validation score (models/training/train.py validation_score)


def save_trained(trained: Trained, out: Path) -> None:
    """Write `trained` to `out` with everything the service needs to encode as it was trained."""
    data = trained.data
    weighting = data.text_weighting
    idf = text_vectorizer(data, weighting).idf if weighting != "binary" else None
    save_checkpoint(
        out,
        model=trained.model,
        train_config=dataclasses.asdict(trained.config),
        history=trained.history,
        vocabulary=data.vocabulary,
        image_backbone=data.image_backbone,
        dataset=data.name,
        text_weighting=weighting,
        idf=idf,
        text_tokens=data.text_tokens,
    )
