"""Train one AUCMH row for use and write its checkpoint: what `cmh train` and the demo build run.

The row's text weighting and tokens travel in the checkpoint, so the service weights and cuts a
query exactly as the model was trained; candidates (one per k) are chosen on validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models.data.dataset import PairDataset
from models.features.pipeline import reweight, text_vectorizer
from models.network.aucmh import HashingModel
from models.network.checkpoint import save_checkpoint
from models.training.train import TrainConfig, train_selecting


@dataclass(frozen=True)
class Trained:
    """A trained checkpoint's model and record, and the dataset its text was weighted into."""

    model: HashingModel
    history: list[dict[str, float]]
    config: TrainConfig  # the kept candidate's
    data: PairDataset  # text features weighted as the model reads them


def train_checkpoint(
    data: PairDataset,
    *,
    out: Path,
    candidates: Sequence[TrainConfig],
    weighting: str,
    progress: bool = False,
) -> Trained:
    """Weight data's binary text as `weighting` (idf from its training texts), train the
    candidates, keep the best on validation and write it to `out` with everything the service
    needs to encode as it was trained."""
    vectorizer = None
    if weighting != "binary":  # the same vocabulary, weighted; idf from the training texts
        vectorizer = text_vectorizer(data, weighting)
        data = reweight(data, weighting)
    model, history, cfg = train_selecting(candidates=candidates, data=data, progress=progress)
    save_checkpoint(
        out,
        model=model,
        train_config=dataclasses.asdict(cfg),
        history=history,
        vocabulary=data.vocabulary,
        image_backbone=data.image_backbone,
        dataset=data.name,
        text_weighting=weighting,
        idf=None if vectorizer is None else vectorizer.idf,
        text_tokens=data.text_tokens,
    )
    return Trained(model=model, history=history, config=cfg, data=data)
