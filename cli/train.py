"""`cmh train`: train AUCMH on a dataset's training part and write one checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from cli.dataset_args import add_dataset_args, prepare_from_args
from models.devices import DEVICES
from models.features.pipeline import reweight, text_vectorizer
from models.features.text import DEFAULT_TOKENS, TOKENIZATIONS, WEIGHTINGS
from models.network.aucmh import BITS, INPUT_NORMS
from models.network.checkpoint import save_checkpoint
from models.training.losses import GRAPH_FUSIONS
from models.training.train import (
    K_GRID,
    LR_SCHEDULES,
    TrainConfig,
    best_epoch,
    train_selecting,
    with_k_grid,
)

DEFAULTS = TrainConfig()


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
    add_dataset_args(p)
    p.add_argument("--out", required=True, type=Path, help="checkpoint file to write")
    p.add_argument(
        "--text-weighting",
        default="binary",
        choices=WEIGHTINGS,
        help="a word's value in a text: binary (the paper's), log(1 + count), or tf-idf with idf "
        "from the training texts; saved in the checkpoint, which the service encodes texts with "
        "(binary)",
    )
    p.add_argument(
        "--text-tokens",
        default=DEFAULT_TOKENS,
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
    p.add_argument("--no-graph-loss", action="store_true", help="ablation: drop L_g")
    p.add_argument("--no-ranking-loss", action="store_true", help="ablation: drop L_r")
    p.add_argument("--no-hash-layer", action="store_true", help="ablation: continuous codes")
    p.add_argument("--device", default=d.device, choices=DEVICES, help="device")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags describe, with the first --k (raises InputError on bad values)."""
    return TrainConfig(
        n_bits=args.bits,
        image_hidden=args.image_hidden,
        text_hidden=args.text_hidden,
        input_norm=args.input_norm,
        dropout=args.dropout,
        k=args.k[0],
        n_anchors=args.anchors,
        beta=args.beta,
        margin=args.margin,
        temperature=args.temperature,
        graph_fusion=args.graph_fusion,
        graph_text_weight=args.graph_text_weight,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        hash_temperature=args.hash_temperature,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        epochs=args.epochs,
        patience=args.patience,
        n_val=args.n_val,
        seed=args.seed,
        use_graph_loss=not args.no_graph_loss,
        use_ranking_loss=not args.no_ranking_loss,
        use_hash_layer=not args.no_hash_layer,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    """Prepare features, train, write the checkpoint and print a one-line summary."""
    candidates = with_k_grid(config_from_args(args), args.k)
    # Binary text, the vocabulary from the training texts, cut as --text-tokens says.
    data = prepare_from_args(args, text_tokens=args.text_tokens)
    weighting = args.text_weighting
    vectorizer = None
    if weighting != "binary":  # the same vocabulary, weighted; idf from the training texts
        vectorizer = text_vectorizer(data, weighting)
        data = reweight(data, weighting)
    start = time.perf_counter()
    model, history, cfg = train_selecting(candidates=candidates, data=data, progress=True)
    seconds = time.perf_counter() - start
    save_checkpoint(
        args.out,
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
    best = best_epoch(history)
    summary = {
        "out": str(args.out),
        "dataset": data.name,
        "n_bits": cfg.n_bits,
        "k": cfg.k,
        "text_weighting": weighting,
        "epochs_run": len(history),
        "best_epoch": int(best["epoch"]),
        "val_i2t": round(best["val_i2t"], 4),
        "val_t2i": round(best["val_t2i"], 4),
        "seconds": round(seconds, 1),
    }
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0
