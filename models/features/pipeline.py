"""From a dataset root to a PairDataset with features: load, extract (cached), vectorise text.

Image features are the expensive part, so they are cached on disk in `cache_dir`, keyed by dataset,
backbone, weights and a digest of the image files' contents and order: a later run with the same
inputs reads the cache, and any changed image, weights file or order gives a new key.
`prepare_loaded` keeps them per image content instead (models/features/content_cache.py), for a
dataset that grows or is sampled anew at every run: a store's items (`cmh train --from-store`).

Text is a bag of words weighted as asked ("binary", "log" or "tfidf": models/features/text.py),
its vocabulary and idf counted on the training texts only. `reweight` re-weights a prepared
dataset's texts with the idf of its own training part, and `text_vectorizer` gives the vectorizer
that made them, the one a checkpoint saves so the service encodes texts the same way.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from common.errors import InputError
from common.fsio import atomic_write
from models.data.dataset import PairDataset
from models.data.loaders import load_dataset
from models.features.content_cache import CachedFeatures, FeatureCache, features_by_content
from models.features.image import DEFAULT_BACKBONE, encode_images, load_backbone
from models.features.text import DEFAULT_TOKENS, WEIGHTINGS, TextVectorizer

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(".cache/features")
DEFAULT_VOCAB_SIZE = 2000


def content_key(data: PairDataset, backbone: str, weights: Path | None) -> str:
    """A digest of what the image features depend on: dataset, backbone, weights, image bytes."""
    h = hashlib.sha256(f"{data.name}\0{backbone}\0".encode())
    if weights is not None:
        h.update(hashlib.sha256(Path(weights).read_bytes()).digest())
    for path in data.image_paths or []:
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:24]


def cached_image_features(
    data: PairDataset,
    *,
    backbone: str,
    weights: Path | None = None,
    cache_dir: Path = DEFAULT_CACHE,
    progress: bool = False,
) -> tuple[np.ndarray, Path, bool]:
    """(features (N, d) float32, cache file, cache hit?) for a dataset of image files."""
    if data.image_paths is None:
        raise InputError(f"expected image files in dataset {data.name!r}, it has features only")
    key = content_key(data, backbone, weights)
    path = Path(cache_dir) / f"{data.name}-{backbone}-{key}.npy"
    if path.is_file():
        features = np.load(path)
        if features.shape[0] == len(data):
            logger.info("image features from cache %s", path)
            return features, path, True
        logger.warning(
            "ignoring cache %s: %d rows for %d images", path, features.shape[0], len(data)
        )
    model = load_backbone(backbone, weights=weights)
    features = encode_images(model, data.image_paths, progress=progress)
    atomic_write(path, lambda f: np.save(f, features))
    logger.info("wrote image features %s to cache %s", features.shape, path)
    return features, path, False


def _texts(data: PairDataset, weighting: str) -> list[str]:
    if data.texts is None:
        raise InputError(
            f"expected raw texts in dataset {data.name!r} to weight text {weighting!r}, "
            "got text features only"
        )
    return data.texts


def fit_text_features(
    data: PairDataset, *, vocab_size: int, weighting: str = "binary", tokens: str = DEFAULT_TOKENS
) -> tuple[np.ndarray, TextVectorizer]:
    """BoW features for every text, the vocabulary (and idf) fitted on the training texts only."""
    texts = _texts(data, weighting)
    vectorizer = TextVectorizer.fit(
        [texts[i] for i in data.train_idx],
        vocab_size=vocab_size,
        weighting=weighting,
        tokens=tokens,
    )
    features, unknown = vectorizer.transform(texts)
    if unknown.any():
        logger.info(
            "%d of %d texts have no vocabulary word (encoded as zeros)", unknown.sum(), len(unknown)
        )
    return features, vectorizer


def text_vectorizer(data: PairDataset, weighting: str) -> TextVectorizer:
    """The vectorizer of data's vocabulary weighted as `weighting`, idf from data.train_idx's
    texts only (what fit_text_features gives when data's vocabulary was fitted on them)."""
    texts = _texts(data, weighting)
    if data.vocabulary is None:
        raise InputError(
            f"expected a bag-of-words vocabulary in dataset {data.name!r} to weight text "
            f"{weighting!r}, got none"
        )
    if weighting not in WEIGHTINGS:
        raise InputError(f"expected a text weighting in {', '.join(WEIGHTINGS)}, got {weighting!r}")
    return TextVectorizer(data.vocabulary, tokens=data.text_tokens).with_weighting(
        weighting, [texts[i] for i in data.train_idx]
    )


def retokenize(data: PairDataset, tokens: str, *, vocab_size: int) -> PairDataset:
    """data with its vocabulary refitted on the training texts cut as `tokens` (binary features;
    reweight after it for another weighting); the image features are kept."""
    assert data.image_features is not None
    text, vectorizer = fit_text_features(data, vocab_size=vocab_size, tokens=tokens)
    return data.with_features(
        image=data.image_features,
        text=text,
        image_backbone=data.image_backbone,
        vocabulary=vectorizer.vocabulary,
        text_tokens=tokens,
    )


def reweight(data: PairDataset, weighting: str) -> PairDataset:
    """data with every text's features weighted as `weighting`, over its vocabulary, the idf
    counted on data.train_idx only (a split's training part: its queries never count)."""
    vectorizer = text_vectorizer(data, weighting)
    features, _ = vectorizer.transform(_texts(data, weighting))
    return replace(data, text_features=features, text_weighting=weighting)


def prepare(
    name: str,
    root: Path,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: Path | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    text_weighting: str = "binary",
    text_tokens: str = DEFAULT_TOKENS,
    cache_dir: Path = DEFAULT_CACHE,
    progress: bool = False,
    seed: int = 0,
) -> PairDataset:
    """Load dataset `name` from root with image and text features (datasets of features as is,
    binary only: another `text_weighting` needs raw texts)."""
    if text_weighting not in WEIGHTINGS:
        raise InputError(
            f"expected a text weighting in {', '.join(WEIGHTINGS)}, got {text_weighting!r}"
        )
    data = load_dataset(name, root, seed=seed)
    if data.image_features is not None and data.text_features is not None:
        # The dataset ships its own features (Wikipedia): they cannot be reweighted or recut.
        if text_weighting != "binary" or text_tokens != DEFAULT_TOKENS:
            raise InputError(
                f"expected raw texts in dataset {name!r} to weight text {text_weighting!r} "
                f"with {text_tokens!r} tokens, got text features only"
            )
        return data
    image, _, _ = cached_image_features(
        data, backbone=backbone, weights=weights, cache_dir=cache_dir, progress=progress
    )
    text, vectorizer = fit_text_features(
        data, vocab_size=vocab_size, weighting=text_weighting, tokens=text_tokens
    )
    return data.with_features(
        image=image,
        text=text,
        image_backbone=backbone,
        vocabulary=vectorizer.vocabulary,
        text_tokens=text_tokens,
        text_weighting=text_weighting,
    )


def prepare_loaded(
    data: PairDataset,
    cache: FeatureCache,
    *,
    backbone: str = DEFAULT_BACKBONE,
    weights: Path | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    digests: Sequence[str | None] | None = None,
    progress: bool = False,
) -> tuple[PairDataset, CachedFeatures]:
    """A loaded dataset of image files and raw texts with features as prepare() gives them, its
    image features kept per image content in `cache` (models/features/content_cache.py;
    `digests`: the images' SHA-256 where known, see features_by_content)."""
    if data.image_paths is None:
        raise InputError(f"expected image files in dataset {data.name!r}, it has features only")
    image = features_by_content(
        data.image_paths,
        cache,
        backbone=backbone,
        weights=weights,
        digests=digests,
        progress=progress,
    )
    text, vectorizer = fit_text_features(data, vocab_size=vocab_size)
    prepared = data.with_features(
        image=image.features,
        text=text,
        image_backbone=backbone,
        vocabulary=vectorizer.vocabulary,
        text_tokens=DEFAULT_TOKENS,
    )
    return prepared, image
