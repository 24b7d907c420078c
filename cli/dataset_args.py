"""The dataset and feature flags that `features`, `train` and `evaluate` share."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import InputError
from models.data.dataset import PairDataset
from models.data.loaders import DATASETS
from models.features.image import BACKBONES, DEFAULT_BACKBONE
from models.features.pipeline import DEFAULT_CACHE, DEFAULT_VOCAB_SIZE, prepare
from models.features.text import DEFAULT_TOKENS


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """--dataset, --root, --backbone, --weights, --cache-dir and --vocab-size."""
    p.add_argument("--dataset", required=True, choices=DATASETS, help="dataset name")
    p.add_argument("--root", required=True, type=Path, help="the dataset's folder")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=BACKBONES, help="image backbone")
    p.add_argument("--weights", type=Path, help="backbone state dict (required for vgg19)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="feature cache folder")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BoW vocabulary size")


def check_weights(args: argparse.Namespace) -> None:
    """VGG19 weights cannot be downloaded here: the user must name a file."""
    if args.backbone == "vgg19" and args.weights is None:
        raise InputError("expected --weights FILE (a torchvision VGG19 state dict), got none")


def prepare_from_args(
    args: argparse.Namespace, *, text_tokens: str = DEFAULT_TOKENS
) -> PairDataset:
    """The dataset the flags name, with image and text features (text cut as text_tokens)."""
    check_weights(args)
    return prepare(
        args.dataset,
        args.root,
        backbone=args.backbone,
        weights=args.weights,
        vocab_size=args.vocab_size,
        text_tokens=text_tokens,
        cache_dir=args.cache_dir,
        progress=True,
    )
