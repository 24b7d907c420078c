"""`cmh train`: train AUCMH on a dataset's training part and write one checkpoint.

`--method NAME` trains an AUCMH row of `cmh evaluate` (models/methods/compare.py METHODS), by
default DEFAULT_METHOD, so that what a user trains is what the evaluated tables report; a flag
given on the command line overrides that row's setting of the same name.

`--from-store ARTIFACTS` trains on what a store serves instead of a dataset (docs/training.md):
its live items, a seeded sample of --max-items when it holds more, image features kept per
image content in ARTIFACTS/feature-cache (bounded by --feature-cache-mib).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from cli.dataset_args import add_dataset_args, prepare_source
from common.errors import InputError
from models.devices import DEVICES
from models.features.text import TOKENIZATIONS, WEIGHTINGS
from models.methods.compare import DEFAULT_METHOD, METHODS, Method, train_row
from models.methods.trained import save_trained
from models.network.aucmh import BITS, INPUT_NORMS
from models.training.losses import GRAPH_FUSIONS
from models.training.train import (
    K_GRID,
    LR_SCHEDULES,
    TrainConfig,
    best_epoch,
)

logger = logging.getLogger(__name__)

DEFAULTS = TrainConfig()
# The `cmh evaluate` rows `cmh train --method` can train (AUCMH's; the baselines are not trained).
TRAINABLE = [name for name, m in METHODS.items() if m.train_options is not None]

# Flags that set a TrainConfig field: dest -> field (the ablation switches are negated below).
FLAG_FIELDS = {
    "bits": "n_bits", "image_hidden": "image_hidden", "text_hidden": "text_hidden",
    "input_norm": "input_norm", "dropout": "dropout", "anchors": "n_anchors", "beta": "beta",
    "margin": "margin", "temperature": "temperature", "graph_fusion": "graph_fusion",
    "graph_text_weight": "graph_text_weight", "lr": "lr", "lr_schedule": "lr_schedule",
    "hash_temperature": "hash_temperature", "weight_decay": "weight_decay",
    "batch_size": "batch_size", "epochs": "epochs", "patience": "patience", "n_val": "n_val",
    "seed": "seed", "short_view_weight": "short_view_weight",
    "short_view_words": "short_view_words", "val_short_words": "val_short_words",
    "device": "device",
}  # fmt: skip
SWITCHES = {
    "no_graph_loss": "use_graph_loss",
    "no_ranking_loss": "use_ranking_loss",
    "no_hash_layer": "use_hash_layer",
}


def _ks(text: str) -> tuple[int, ...]:
    """'20,100' -> (20, 100): the values of k to train and choose among on validation."""
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        ks = ()
    if not ks:
        raise argparse.ArgumentTypeError(
            f"expected k or comma-separated ks like 20,100, got {text!r}"
        )
    return ks


def _widths(text: str) -> tuple[int, ...]:
    """'1024,512' -> (1024, 512); '' -> () (no hidden layer: a linear hash function)."""
    try:
        return tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated widths like 1024,512, got {text!r}"
        ) from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `train`."""
    d = DEFAULTS
    p = subparsers.add_parser(
        "train",
        help="train AUCMH on a dataset and write a checkpoint",
        description="Train AUCMH (anchor-graph loss + ranking loss, binary hash layer) on the "
        "training part of a dataset, choosing the epoch on a validation split carved out of it, "
        "and write one self-contained checkpoint.",
    )
    add_dataset_args(p, from_store=True)
    p.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=TRAINABLE,
        help=f"the `cmh evaluate` row to train (default {DEFAULT_METHOD}, the best validated; "
        "docs/keyword-queries.md); the flags below override its settings",
    )
    p.add_argument(
        "--text-weighting",
        choices=WEIGHTINGS,
        help="a word's value in a text: binary (the paper's), log(1 + count), or tf-idf with idf "
        "from the training texts; saved in the checkpoint, which the service encodes texts with "
        "(binary)",
    )
    p.add_argument(
        "--text-tokens",
        choices=TOKENIZATIONS,
        help="how Chinese text is cut into words: jieba's accurate mode (words) or its search "
        "mode, which adds the shorter words inside long ones (search: beyond the paper); saved "
        "in the checkpoint, which the service cuts queries with (words)",
    )
    p.add_argument("--bits", type=int, default=d.n_bits, choices=BITS, help="n_bits")
    p.add_argument("--image-hidden", type=_widths, default=d.image_hidden, help="e.g. 1024,1024")
    p.add_argument("--text-hidden", type=_widths, default=d.text_hidden, help="e.g. 1024")
    p.add_argument(
        "--input-norm", default=d.input_norm, choices=INPUT_NORMS, help="feature scaling"
    )
    p.add_argument(
        "--dropout", type=float, default=d.dropout, help=f"after hidden layers ({d.dropout})"
    )
    p.add_argument(
        "--k",
        type=_ks,
        default=K_GRID,
        help="nearest anchors per point; several (comma-separated) train one model each and keep "
        f"the best on validation ({','.join(map(str, K_GRID))})",
    )
    p.add_argument("--anchors", type=int, default=d.n_anchors, help=f"m ({d.n_anchors})")
    p.add_argument("--beta", type=float, default=d.beta, help=f"weight of L_g ({d.beta})")
    p.add_argument("--margin", type=float, default=d.margin, help=f"gamma of L_r ({d.margin})")
    p.add_argument("--temperature", type=float, default=d.temperature, help="of Q (1 = paper)")
    p.add_argument(
        "--graph-fusion",
        default=d.graph_fusion,
        choices=GRAPH_FUSIONS,
        help=f"how P joins the two graphs ({d.graph_fusion} = paper; product: beyond it)",
    )
    p.add_argument(
        "--graph-text-weight",
        type=float,
        default=d.graph_text_weight,
        help=f"the text graph's share w of P = (1 - w) G_image + w G_text ({d.graph_text_weight}"
        " = paper)",
    )
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate ({d.lr})")
    p.add_argument(
        "--lr-schedule",
        default=d.lr_schedule,
        choices=LR_SCHEDULES,
        help=f"learning rate over the epochs ({d.lr_schedule}; cosine: beyond the paper)",
    )
    p.add_argument(
        "--hash-temperature",
        type=float,
        default=d.hash_temperature,
        help=f"T of tanh(z / T) in training ({d.hash_temperature:g} = paper; codes are sign(z))",
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="Adam L2 penalty")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"n ({d.batch_size})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"most epochs ({d.epochs})")
    p.add_argument("--patience", type=int, default=d.patience, help="epochs without improvement")
    p.add_argument("--n-val", type=int, default=d.n_val, help="validation pairs (of train)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for split, anchors, weights")
    p.add_argument(
        "--short-view-weight",
        type=float,
        default=d.short_view_weight,
        help="weight of the loss on short text views (1..--short-view-words words of each "
        f"caption) beside the whole caption ({d.short_view_weight:g}: off, the paper's)",
    )
    p.add_argument(
        "--short-view-words", type=int, default=d.short_view_words, help="most words in a view"
    )
    p.add_argument(
        "--val-short-words",
        type=int,
        default=d.val_short_words,
        help="keep the epoch that is best also for validation captions cut to 1..N words "
        f"({d.val_short_words}: whole captions only, the paper's)",
    )
    p.add_argument("--no-graph-loss", action="store_true", help="ablation: drop L_g")
    p.add_argument("--no-ranking-loss", action="store_true", help="ablation: drop L_r")
    p.add_argument("--no-hash-layer", action="store_true", help="ablation: continuous codes")
    p.add_argument("--device", default=d.device, choices=DEVICES, help="device")
    # A flag not given leaves the method's setting: the defaults above are only for --help.
    for action in p._actions:
        if action.dest in FLAG_FIELDS or action.dest in SWITCHES or action.dest == "k":
            action.default = argparse.SUPPRESS
    p.set_defaults(run=run)


def method_of(args: argparse.Namespace) -> Method:
    """The METHODS row --method names (raises InputError for a baseline or an unknown name)."""
    method = METHODS.get(args.method)
    if method is None or method.train_options is None:
        raise InputError(f"expected --method from {', '.join(TRAINABLE)}, got {args.method!r}")
    return method


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the flags given on the command line set."""
    given = vars(args)
    options = {field: given[dest] for dest, field in FLAG_FIELDS.items() if dest in given}
    options.update({field: False for dest, field in SWITCHES.items() if given.get(dest)})
    return options


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of --method (of each candidate of a choosing row) with the flags given on
    top, with the first --k (raises InputError on bad values)."""
    method = method_of(args)
    rows = [METHODS[name] for name in method.candidates] or [method]
    configs = [
        TrainConfig(
            **{**(row.train_options or {}), **overrides_from_args(args), "k": ks_of(args)[0]}
        )
        for row in rows
    ]
    return configs[-1]


def ks_of(args: argparse.Namespace) -> tuple[int, ...]:
    """The --k values, K_GRID when not given."""
    ks: tuple[int, ...] = getattr(args, "k", K_GRID)
    return ks


def run(args: argparse.Namespace) -> int:
    """Prepare features, train, write the checkpoint and print a one-line summary."""
    method = method_of(args)
    config = config_from_args(args)  # a bad flag fails before the data loads
    # Binary words as prepared; train_row cuts and weights them as the row (or a flag) says.
    data = prepare_source(args, seed=config.seed)
    start = time.perf_counter()
    trained = train_row(
        data,
        method,
        overrides=overrides_from_args(args),
        ks=ks_of(args),
        progress=True,
        vocab_size=args.vocab_size,
        text=(args.text_weighting, args.text_tokens),
    )
    save_trained(trained, args.out)
    seconds = time.perf_counter() - start
    best = best_epoch(trained.history)
    summary = {
        "out": str(args.out),
        "method": method.name,
        "trained": trained.method,
        "dataset": data.name,
        "n_bits": trained.config.n_bits,
        "k": trained.config.k,
        "text_weighting": trained.data.text_weighting,
        "text_tokens": trained.data.text_tokens,
        "epochs_run": len(trained.history),
        "best_epoch": int(best["epoch"]),
        "val_i2t": round(best["val_i2t"], 4),
        "val_t2i": round(best["val_t2i"], 4),
        "seconds": round(seconds, 1),
    }
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0
