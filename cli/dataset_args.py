"""The dataset and feature flags that `features`, `train` and `evaluate` share, and the store
`train --from-store` reads instead of a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import InputError
from models.data.dataset import PairDataset
from models.data.loaders import DATASETS
from models.data.stored import stored_pairs
from models.features.content_cache import (
    DEFAULT_MAX_BYTES,
    STORE_CACHE_DIR,
    CachedFeatures,
    FeatureCache,
)
from models.features.image import BACKBONES, DEFAULT_BACKBONE
from models.features.pipeline import DEFAULT_CACHE, DEFAULT_VOCAB_SIZE, prepare, prepare_loaded
from models.features.text import DEFAULT_TOKENS
from service.settings import Settings
from service.stores import open_item_store, served_version
from store import versions
from store.milvus_store import MilvusStore
from store.snapshot import MIN_ITEMS, StoredItems, image_sha256, read_items

DEFAULT_MAX_ITEMS = 200_000  # --from-store: items trained on at most (a seeded sample past it)


def add_dataset_args(p: argparse.ArgumentParser, *, from_store: bool = False) -> None:
    """--dataset, --root, --backbone, --weights, --cache-dir and --vocab-size. With `from_store`
    (`train`), also --from-store and its flags: --dataset and --root are then optional
    (prepare_source checks that one source is named) and --backbone defaults to None: the
    store's own, else DEFAULT_BACKBONE."""
    p.add_argument("--dataset", required=not from_store, choices=DATASETS, help="dataset name")
    p.add_argument("--root", required=not from_store, type=Path, help="the dataset's folder")
    p.add_argument(
        "--backbone",
        default=None if from_store else DEFAULT_BACKBONE,
        choices=BACKBONES,
        help=f"image backbone ({DEFAULT_BACKBONE}"
        + ("; --from-store: the one the store's codes were made with)" if from_store else ")"),
    )
    p.add_argument("--weights", type=Path, help="backbone state dict (required for vgg19)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="feature cache folder")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BoW vocabulary size")
    if from_store:
        _add_store_args(p)


def _add_store_args(p: argparse.ArgumentParser) -> None:
    """--from-store, --max-items and --feature-cache-mib."""
    p.add_argument(
        "--from-store",
        type=Path,
        metavar="ARTIFACTS",
        help="train on the live items of the store in ARTIFACTS instead of --dataset/--root "
        "(the local store; it may be serving meanwhile)",
    )
    p.add_argument(
        "--max-items",
        type=int,
        default=DEFAULT_MAX_ITEMS,
        help=f"--from-store: a seeded sample (--seed) of this many items when the store holds "
        f"more ({DEFAULT_MAX_ITEMS:,}; at least {MIN_ITEMS})",
    )
    p.add_argument(
        "--feature-cache-mib",
        type=int,
        default=DEFAULT_MAX_BYTES >> 20,
        help=f"--from-store: most MiB of image features ARTIFACTS/{STORE_CACHE_DIR} keeps, the "
        f"least recently used dropped past it ({DEFAULT_MAX_BYTES >> 20})",
    )


def check_weights(args: argparse.Namespace, backbone: str | None = None) -> None:
    """VGG19 weights cannot be downloaded here: the user must name a file."""
    if (backbone or args.backbone) == "vgg19" and args.weights is None:
        raise InputError("expected --weights FILE (a torchvision VGG19 state dict), got none")


def prepare_from_args(
    args: argparse.Namespace, *, text_tokens: str = DEFAULT_TOKENS
) -> PairDataset:
    """The dataset the flags name, with image and text features (text cut as text_tokens)."""
    check_weights(args)
    return prepare(
        args.dataset,
        args.root,
        backbone=args.backbone or DEFAULT_BACKBONE,
        weights=args.weights,
        vocab_size=args.vocab_size,
        text_tokens=text_tokens,
        cache_dir=args.cache_dir,
        progress=True,
    )


def prepare_source(args: argparse.Namespace, *, seed: int) -> PairDataset:
    """The dataset --dataset/--root or --from-store names (exactly one), with features; a store's
    is sampled with `seed` and said in one printed line."""
    if args.from_store is None:
        if args.dataset is None or args.root is None:
            raise InputError(
                "expected --dataset and --root, or --from-store ARTIFACTS, got neither"
            )
        return prepare_from_args(args)
    if args.dataset is not None or args.root is not None:
        raise InputError("expected --from-store ARTIFACTS or --dataset/--root, got both")
    if args.max_items < MIN_ITEMS:
        raise InputError(f"expected --max-items of at least {MIN_ITEMS}, got {args.max_items}")
    if args.feature_cache_mib < 1:
        raise InputError(
            f"expected --feature-cache-mib of at least 1, got {args.feature_cache_mib}"
        )
    data, image = prepare_from_store(
        args.from_store,
        args,
        max_items=args.max_items,
        seed=seed,
        cache_bytes=args.feature_cache_mib << 20,
    )
    print(
        f"from store {args.from_store}: {len(data)} items, {data.protocol}; "
        f"{len(data.rejected)} rejected; {len(data.label_names)} labels; images "
        f"({data.image_backbone}): {image.cached} from the feature cache, {image.encoded} encoded"
    )
    return data


def prepare_from_store(
    artifacts: Path, args: argparse.Namespace, *, max_items: int, seed: int, cache_bytes: int
) -> tuple[PairDataset, CachedFeatures]:
    """The live items of the store in artifacts (a seeded sample of max_items when it holds
    more) with features, image features kept per content in artifacts/feature-cache; the image
    backbone is --backbone, else the one that made the store's codes (if one of BACKBONES)."""
    # the served version's store (store/versions.py): what a retrain should learn from
    stored = read_served_items(artifacts, max_items=max_items, seed=seed)
    served = stored.manifest.image_backbone
    backbone = args.backbone or (served if served in BACKBONES else DEFAULT_BACKBONE)
    check_weights(args, backbone)
    items = stored.items
    data = stored_pairs(
        artifacts,
        ids=[item.id for item in items],
        texts=[item.text for item in items],
        images=[item.image for item in items],
        fields=[item.fields for item in items],
        n_live=stored.n_live,
    )
    base = artifacts.resolve()
    digests = [image_sha256(p.relative_to(base).as_posix()) for p in data.image_paths or []]
    cache = FeatureCache(artifacts / STORE_CACHE_DIR, max_bytes=cache_bytes)
    try:
        return prepare_loaded(
            data,
            cache,
            digests=digests,
            backbone=backbone,
            weights=args.weights,
            vocab_size=args.vocab_size,
            progress=True,
        )
    finally:
        cache.close()


def read_served_items(artifacts: Path, *, max_items: int, seed: int) -> StoredItems:
    """The served version's items (a seeded sample of max_items when there are more): from its
    local store, or, with CMH_INDEX_BACKEND=milvus (as `cmh serve` reads it), its collection."""
    settings = Settings(artifacts_dir=artifacts)
    if settings.index_backend != "milvus":
        return read_items(versions.serving_dir(artifacts), max_items=max_items, seed=seed)
    if max_items < MIN_ITEMS:
        raise InputError(f"expected max_items of at least {MIN_ITEMS}, got {max_items}")
    store = open_item_store(settings, None, shared=False, version=served_version(settings))
    try:
        assert isinstance(store, MilvusStore)
        return store.sample_items(max_items=max_items, seed=seed)
    finally:
        store.close()
