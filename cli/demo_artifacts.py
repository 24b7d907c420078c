"""The demo's artifacts: dataset, features, a trained checkpoint and a store indexing every scene.

`build_demo(artifacts)` makes whatever is missing, in order, and says what it did; everything it
writes is atomic, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from indexes.codes import pack_codes
from models.data.demo import N_DEFAULT, generate_demo
from models.features.pipeline import prepare, retokenize, reweight
from models.methods.compare import DEFAULT_METHOD, METHODS, train_row
from models.methods.trained import save_trained
from models.network.checkpoint import load_checkpoint
from models.training.train import best_epoch
from service.indexing import dataset_ids
from store import legacy
from store.layout import CHECKPOINT_NAME, open_store
from store.manifest import manifest_for
from store.rows import NewItems

logger = logging.getLogger(__name__)

DEMO_BITS = 64
DEMO_EPOCHS = 40  # the demo's validation MAP levels off well before this (see README)


def build_demo(
    artifacts: Path, *, n: int = N_DEFAULT, epochs: int = DEMO_EPOCHS, progress: bool = False
) -> list[str]:
    """Build the missing demo artifacts under `artifacts`; returns one line per step."""
    report: list[str] = []
    root = artifacts / "demo"
    start = time.perf_counter()
    if (root / "captions.jsonl").is_file():
        report.append(f"demo dataset: present in {root}")
    else:
        generate_demo(root, n=n, progress=progress)
        report.append(f"demo dataset: generated {n} scenes in {root} ({_since(start)})")
    start = time.perf_counter()
    # The demo trains what `cmh train` trains by default (binary words prepared: the row cuts
    # and weights its own).
    data = prepare("demo", root, cache_dir=artifacts / "features", progress=progress)
    assert data.image_features is not None and data.text_features is not None
    assert data.image_paths is not None and data.texts is not None and data.vocabulary is not None
    report.append(
        f"features: image {data.image_features.shape} ({data.image_backbone}), "
        f"text {data.text_features.shape} bag of words ({_since(start)})"
    )
    checkpoint = artifacts / CHECKPOINT_NAME
    if checkpoint.is_file():
        report.append(f"checkpoint: present at {checkpoint}")
    else:
        start = time.perf_counter()
        trained = train_row(  # CUDA if any
            data,
            METHODS[DEFAULT_METHOD],
            overrides={"n_bits": DEMO_BITS, "epochs": epochs},
            progress=progress,
        )
        save_trained(trained, checkpoint)
        best = best_epoch(trained.history)
        report.append(
            f"checkpoint: trained {trained.method} {DEMO_BITS} bits (kept k {trained.config.k}) "
            f"in {_since(start)}; best validation MAP "
            f"i2t {best['val_i2t']:.3f} t2i {best['val_t2i']:.3f} -> {checkpoint}"
        )
    if legacy.has_generations(artifacts):
        report.append(f"index: present in {artifacts / legacy.LEGACY_DIR} (migrated when served)")
        return report
    start = time.perf_counter()
    loaded = load_checkpoint(checkpoint)
    model = loaded.model
    # The text as the checkpoint cuts and weights it (vocabulary and idf from the same training
    # texts, so the same as in training).
    cut = data
    if loaded.text_tokens != data.text_tokens:
        cut = retokenize(data, loaded.text_tokens, vocab_size=len(loaded.vocabulary or []))
    text_features = reweight(cut, loaded.text_weighting).text_features
    assert text_features is not None
    manifest = manifest_for(
        checkpoint, n_bits=DEMO_BITS, backbone=data.image_backbone, vocabulary=data.vocabulary
    )
    # An empty store is what a build interrupted before its one commit leaves: fill it.
    store = open_store(artifacts, expected=manifest)
    try:
        if len(store):
            report.append(f"index: present in {store.root} ({len(store)} items)")
            return report
        store.add(
            NewItems(
                ids=dataset_ids(data),
                texts=data.texts,
                images=[str(path.relative_to(artifacts)) for path in data.image_paths],
                image_codes=pack_codes(model.encode_image(data.image_features)),
                text_codes=pack_codes(model.encode_text(text_features)),
            )
        )
        report.append(f"index: {len(store)} items, both directions ({_since(start)})")
    finally:
        store.close()
    return report


def _since(start: float) -> str:
    return f"{time.perf_counter() - start:.0f} s"
