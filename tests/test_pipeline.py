"""The feature pipeline: cached image features keyed by content, text fitted on training only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from models.data.dataset import PairDataset
from models.data.loaders import load_dataset
from models.features.pipeline import cached_image_features, prepare


def test_cache_is_hit_on_the_second_run_and_missed_after_a_change(
    tiny_demo_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "demo"
    shutil.copytree(tiny_demo_root, root)
    data = load_dataset("demo", root)
    cache = tmp_path / "cache"
    first, path, hit = cached_image_features(data, backbone="efficientnet-lite0", cache_dir=cache)
    assert not hit and path.is_file() and first.shape == (len(data), 1280)
    second, path2, hit2 = cached_image_features(
        data, backbone="efficientnet-lite0", cache_dir=cache
    )
    assert hit2 and path2 == path and np.array_equal(first, second)
    shutil.copy(root / "images" / "00001.jpg", root / "images" / "00000.jpg")
    _, path3, hit3 = cached_image_features(
        load_dataset("demo", root), backbone="efficientnet-lite0", cache_dir=cache
    )
    assert not hit3 and path3 != path


def test_prepare_fits_the_vocabulary_on_training_texts(demo_data: PairDataset) -> None:
    data = demo_data
    assert data.image_features is not None and data.text_features is not None
    assert data.image_backbone == "efficientnet-lite0" and data.vocabulary is not None
    assert data.text_features.shape == (len(data), len(data.vocabulary))
    assert {"car", "boat", "red", "sky"} <= set(data.vocabulary)


def test_prepare_keeps_feature_datasets_as_they_are(wikipedia_root: Path) -> None:
    data = prepare("wikipedia", wikipedia_root)
    assert data.image_features is not None and data.image_features.shape[1] == 128
