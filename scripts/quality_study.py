"""Quality study (issue 17): options beyond the paper against the `aucmh` reference, on validation.

Every figure is a validation figure: as in scripts/tune_aucmh.py, an outer fifth of the dataset's
training part (seeded by 1000 + seed) is held out as queries against the rest as database, AUCMH
trains on the rest (carving its own epoch-selection split inside, as `cmh evaluate` does) and is
scored on the held-out pairs, MAP@all in both directions. The dataset's query set is never read.
"aucmh" is TrainConfig's defaults, the `cmh evaluate` method of that name: the reference row.
Each other variant changes one or two named options, so its row shows what that option buys.
`--k grid` trains one model per k in K_GRID as `cmh evaluate` does; a single k (the one that grid
keeps: 100 on Wikipedia, 20 on Web News) halves the cost, for every row alike. Runs are on CPU.

    python -m scripts.quality_study --dataset wikipedia --root ../shared/data/wikipedia \
        --bits 64 --seeds 0,1,2 --k 100 --variants aucmh,epochs-200,cosine \
        --json docs/results/quality-study.json

The JSON file holds one entry per (dataset, variant, bits); a run adds its seeds to an entry of the
same options and k (replacing seeds run again) and keeps the other entries, so datasets, variants
and seeds can be run separately (even at once: writes are locked).
Entry keys: dataset, variant, options (the TrainConfig fields and text weighting it sets), bits,
k ("grid" when chosen per run from K_GRID on the inner split, else the fixed k), seeds,
i2t_mean / i2t_std / t2i_mean / t2i_std (held-out MAP@all over seeds, std with ddof 0),
kept_epoch_mean, and runs: per seed the held-out i2t / t2i, the inner-split val_i2t / val_t2i
of the kept epoch (the figures the epoch was chosen on, so biased upwards), kept_epoch,
epochs_run, the k kept and the training seconds.

Over 400 lines because each variant's options, the held-out protocol and the locked JSON merge
are one study's parts.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF

from common.errors import InputError
from common.fsio import atomic_write
from models.data.dataset import PairDataset
from models.features.image import DEFAULT_BACKBONE, load_backbone, open_image, pixels_to_input
from models.features.pipeline import (
    DEFAULT_CACHE,
    DEFAULT_VOCAB_SIZE,
    content_key,
    prepare,
    reweight,
)
from models.features.text import DEFAULT_TOKENS, TextVectorizer
from models.training.train import (
    TrainConfig,
    best_epoch,
    config_from_dict,
    train_selecting,
    with_k_grid,
)
from scripts.tune_aucmh import outer_split, score


class Variant(NamedTuple):
    """One row: TrainConfig fields over the defaults, text weighting, image backbone, vocabulary,
    Chinese tokens, image crops.

    A "k" in fields fixes k for the row, whatever --k says.
    """

    fields: dict[str, Any]
    weighting: str
    backbone: str = DEFAULT_BACKBONE  # what `cmh evaluate` and `cmh train` use by default
    vocab_size: int = DEFAULT_VOCAB_SIZE  # the bag of words' vocabulary (`--vocab-size`)
    tokens: str = DEFAULT_TOKENS  # how Chinese text is cut (`cmh train --text-tokens`)
    crops: str = "centre"  # which crops' features are averaged: one of CROPS (study only)


# An image's feature as the mean over crops of the backbone's resized image (the resize and crop
# sides of the backbone): the centre crop alone (what the pipeline and the service compute),
# with its mirror image, or torchvision's ten crops (four corners and the centre, and their
# mirrors). Only this study computes the pooled ones: they did not help (README).
CROPS = {"centre": [4], "flip": [4, 9], "ten": list(range(10))}  # indices into ten_crop's order


def _around_best(**fields: Any) -> Variant:
    """Web News' best row (search-mode tf-idf text, the text graph at w 0.8) with `fields` over it."""
    return Variant({"graph_text_weight": 0.8, **fields}, "tfidf", tokens="search")


# name -> Variant. "aucmh" is the reference row.
# A weighting is one of models/features/text.py's WEIGHTINGS: the binary bag of words, log(1 +
# counts), or tf-idf rows of unit length (idf from the fitting texts), as `cmh train
# --text-weighting` trains and the service encodes them.
VARIANTS: dict[str, Variant] = {
    "aucmh": Variant({}, "binary"),
    "epochs-200": Variant({"epochs": 200}, "binary"),
    "epochs-200-patience-40": Variant({"epochs": 200, "patience": 40}, "binary"),
    "patience-10": Variant({"patience": 10}, "binary"),
    "cosine": Variant({"lr_schedule": "cosine"}, "binary"),
    "cosine-200": Variant({"lr_schedule": "cosine", "epochs": 200}, "binary"),
    "lr-1e-3": Variant({"lr": 1e-3}, "binary"),
    "batch-128": Variant({"batch_size": 128}, "binary"),
    "batch-512": Variant({"batch_size": 512}, "binary"),
    "softmax-t-0.5": Variant({"temperature": 0.5}, "binary"),
    "softmax-t-2": Variant({"temperature": 2.0}, "binary"),
    "hash-t-0.5": Variant({"hash_temperature": 0.5}, "binary"),
    "hash-t-2": Variant({"hash_temperature": 2.0}, "binary"),
    "hash-t-4": Variant({"hash_temperature": 4.0}, "binary"),
    "contrastive-0.5": Variant({"contrastive_weight": 0.5}, "binary"),
    "contrastive-1": Variant({"contrastive_weight": 1.0}, "binary"),
    "contrastive-0.5-t-0.5": Variant(
        {"contrastive_weight": 0.5, "contrastive_temperature": 0.5},
        "binary",
    ),
    "contrastive-0.5-t-1": Variant(
        {"contrastive_weight": 0.5, "contrastive_temperature": 1.0}, "binary"
    ),
    "contrastive-0.2-t-0.3": Variant(
        {"contrastive_weight": 0.2, "contrastive_temperature": 0.3},
        "binary",
    ),
    "text-log": Variant({}, "log"),
    "text-tfidf": Variant({}, "tfidf"),
    "text-tfidf-200": Variant({"epochs": 200}, "tfidf"),
    "tfidf-contrastive-0.5-t-0.5": Variant(
        {"contrastive_weight": 0.5, "contrastive_temperature": 0.5},
        "tfidf",
    ),
    "tfidf-contrastive-0.2-t-0.3": Variant(
        {"contrastive_weight": 0.2, "contrastive_temperature": 0.3},
        "tfidf",
    ),
    # Inputs beyond the paper's features: EfficientNet-Lite1 / Lite2 image features (Web News;
    # Wikipedia ships its own features), alone and with tf-idf text (Web News's best weighting).
    "lite1": Variant({}, "binary", "efficientnet-lite1"),
    "lite2": Variant({}, "binary", "efficientnet-lite2"),
    "tfidf-lite1": Variant({}, "tfidf", "efficientnet-lite1"),
    "tfidf-lite2": Variant({}, "tfidf", "efficientnet-lite2"),
    # m, the anchor count: min(4096, N) makes every fitting point an anchor on both datasets here;
    # fewer anchors give a smoother, lower-rank graph (the anchor graph's original purpose).
    "anchors-256": Variant({"n_anchors": 256}, "binary"),
    "anchors-512": Variant({"n_anchors": 512}, "binary"),
    "anchors-1024": Variant({"n_anchors": 1024}, "binary"),
    "tfidf-anchors-512": Variant({"n_anchors": 512}, "tfidf"),
    # Web News keeps the smallest k of (20, 100) and k 30 was worse than 20: below 20.
    "tfidf-k-10": Variant({"k": 10}, "tfidf"),
    "tfidf-k-5": Variant({"k": 5}, "tfidf"),
    # A larger vocabulary (words in >= 2 training texts; Web News has more than 2,000 of them).
    "tfidf-vocab-4000": Variant({}, "tfidf", vocab_size=4000),
    "tfidf-vocab-8000": Variant({}, "tfidf", vocab_size=8000),
    # jieba's search-engine mode: long words also give the shorter words inside them.
    "search": Variant({}, "binary", tokens="search"),
    "tfidf-search": Variant({}, "tfidf", tokens="search"),
    "tfidf-search-flip": Variant({}, "tfidf", tokens="search", crops="flip"),
    "tfidf-search-ten-crops": Variant({}, "tfidf", tokens="search", crops="ten"),
    "tfidf-lite2-200": Variant({"epochs": 200}, "tfidf", "efficientnet-lite2"),
    # Q's softmax over code cosines in [-1, 1] at temperature 1 (Eq. 5) is nearly flat over a
    # batch of 256, so it cannot follow a peaked P: lower temperatures let it.
    "tfidf-softmax-t-0.5": Variant({"temperature": 0.5}, "tfidf"),
    "tfidf-softmax-t-0.25": Variant({"temperature": 0.25}, "tfidf"),
    "tfidf-softmax-t-0.1": Variant({"temperature": 0.1}, "tfidf"),
    # P as the product of the two graphs (near only where both agree) instead of their mean.
    "graph-product": Variant({"graph_fusion": "product"}, "binary"),
    "tfidf-graph-product": Variant({"graph_fusion": "product"}, "tfidf"),
    # P as a weighted mean, (1 - w) G_image + w G_text, instead of the paper's equal halves.
    "graph-text-0.3": Variant({"graph_text_weight": 0.3}, "binary"),
    "graph-text-0.7": Variant({"graph_text_weight": 0.7}, "binary"),
    "graph-text-0.9": Variant({"graph_text_weight": 0.9}, "binary"),
    "tfidf-search-graph-text-0.3": Variant({"graph_text_weight": 0.3}, "tfidf", tokens="search"),
    "tfidf-search-graph-text-0.7": Variant({"graph_text_weight": 0.7}, "tfidf", tokens="search"),
    "tfidf-search-graph-text-0.8": Variant({"graph_text_weight": 0.8}, "tfidf", tokens="search"),
    "tfidf-search-graph-text-0.9": Variant({"graph_text_weight": 0.9}, "tfidf", tokens="search"),
    # Around Web News' best row (search-mode tf-idf, w 0.8): does anything else move it now?
    "gt-0.8-beta-0.9": _around_best(beta=0.9),
    "gt-0.8-beta-0.6": _around_best(beta=0.6),
    "gt-0.8-margin-0.6": _around_best(margin=0.6),
    "gt-0.8-softmax-t-0.5": _around_best(temperature=0.5),
    "gt-0.8-lr-1e-4-200": _around_best(lr=1e-4, epochs=200),
    "gt-0.8-k-40": _around_best(k=40),
    "gt-0.8-k-10": _around_best(k=10),
    "gt-0.8-contrastive-0.2-t-0.3": _around_best(
        contrastive_weight=0.2, contrastive_temperature=0.3
    ),
    # The network: two hidden layers per modality instead of one; more dropout.
    "tfidf-deep": Variant({"image_hidden": (2048, 2048), "text_hidden": (2048, 2048)}, "tfidf"),
    "tfidf-dropout-0.5": Variant({"dropout": 0.5}, "tfidf"),
    # Wikipedia keeps k 100, the top of K_GRID (20, 100), in 8 of 9 runs: past the grid's edge.
    "k-200": Variant({"k": 200}, "binary"),
    "k-400": Variant({"k": 400}, "binary"),
    "deep": Variant({"image_hidden": (2048, 2048), "text_hidden": (2048, 2048)}, "binary"),
    # Do Wikipedia's two small gains (512 anchors, a weak contrastive term) add up?
    "anchors-512-contrastive-0.2-t-0.3": Variant(
        {"n_anchors": 512, "contrastive_weight": 0.2, "contrastive_temperature": 0.3}, "binary"
    ),
}


def options_of(variant: Variant) -> dict[str, Any]:
    """What a JSON entry records as its options (the backbone only when it is not the default,
    so entries written before backbones were a variant's still merge)."""
    options = {**variant.fields, "text_weighting": variant.weighting}
    if variant.backbone != DEFAULT_BACKBONE:
        options["image_backbone"] = variant.backbone
    if variant.vocab_size != DEFAULT_VOCAB_SIZE:
        options["vocab_size"] = variant.vocab_size
    if variant.tokens != DEFAULT_TOKENS:
        options["text_tokens"] = variant.tokens
    if variant.crops != "centre":
        options["image_crops"] = variant.crops
    return options


def ten_crop_features(data: PairDataset, backbone_name: str, cache: Path) -> np.ndarray:
    """(N, 10, d) float32 backbone features of each image's ten crops (torchvision's order),
    cached in `cache` under the pipeline's content key of the images."""
    paths = data.image_paths or []
    if not paths:
        raise InputError(f"expected image files to crop in dataset {data.name!r}, got features")
    key = content_key(data, backbone_name, None)
    path = cache / f"{data.name}-{backbone_name}-ten-crops-{key}.npy"
    if path.is_file():
        return np.load(path)  # type: ignore[no-any-return]
    backbone = load_backbone(backbone_name)
    out = np.empty((len(paths), 10, backbone.dim), dtype=np.float32)
    for i, image_path in enumerate(paths):
        image = open_image(Path(image_path), draft=True, min_side=backbone.draft_min_side)
        resized = TF.resize(image, backbone.resize, interpolation=TF.InterpolationMode.BICUBIC)
        pixels = np.stack([np.asarray(c) for c in TF.ten_crop(resized, backbone.crop)])
        with torch.inference_mode():
            out[i] = backbone.net(pixels_to_input(backbone, pixels)).float().cpu().numpy()
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, out))
    return out


def with_crops(
    data: PairDataset, crops: str, backbone_name: str, cache: Path = DEFAULT_CACHE
) -> PairDataset:
    """The dataset with each image's feature the mean over `crops` (CROPS) of its crops."""
    if crops == "centre":
        return data  # prepare's features
    pooled = ten_crop_features(data, backbone_name, cache)[:, CROPS[crops]].mean(axis=1)
    return dataclasses.replace(data, image_features=pooled.astype(np.float32))


def count_matrix(texts: list[str], vocabulary: list[str]) -> np.ndarray:
    """(n, len(vocabulary)) float32 term counts, as models/features/text.py counts them."""
    vectorizer = TextVectorizer(vocabulary)
    columns, counts = vectorizer.counts(texts)
    return vectorizer.dense(columns, [c.astype(np.float32) for c in counts])


def weighted_text(data: PairDataset, weighting: str) -> PairDataset:
    """The dataset with its text features re-weighted (models/features/pipeline.py's `reweight`,
    what `cmh train --text-weighting` trains on); idf is counted on data.train_idx only."""
    if weighting == "binary":
        return data  # prepare's features are binary
    return reweight(data, weighting)


def run_one(
    data: PairDataset, *, fields: dict[str, Any], n_bits: int, seed: int, k: int | None
) -> dict[str, Any]:
    """Train one variant at one length and seed on data.train_idx; score it on data.query_idx."""
    start = time.perf_counter()
    cfg = config_from_dict({**fields, "n_bits": n_bits, "seed": seed, "device": "cpu"})
    candidates = with_k_grid(cfg) if k is None else [dataclasses.replace(cfg, k=k)]
    model, history, chosen = train_selecting(candidates=candidates, data=data)
    kept = best_epoch(history)
    row = score(data, model, "aucmh", n_bits, seed)
    return {
        "seed": seed,
        "i2t": row["i2t"],
        "t2i": row["t2i"],
        "val_i2t": kept["val_i2t"],
        "val_t2i": kept["val_t2i"],
        "kept_epoch": int(kept["epoch"]),
        "epochs_run": len(history),
        "k": chosen.k,
        "seconds": round(time.perf_counter() - start, 1),
    }


def summary(
    *, dataset: str, variant: str, n_bits: int, k: int | None, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """One JSON entry: mean and spread over seeds of the held-out MAPs, and every run."""
    entry: dict[str, Any] = {
        "dataset": dataset,
        "variant": variant,
        "options": options_of(VARIANTS[variant]),
        "bits": n_bits,
        "k": "grid" if k is None else k,
        "seeds": [r["seed"] for r in runs],
    }
    for key in ("i2t", "t2i"):
        values = np.array([r[key] for r in runs])
        entry[f"{key}_mean"] = float(values.mean())
        entry[f"{key}_std"] = float(values.std())
    entry["kept_epoch_mean"] = float(np.mean([r["kept_epoch"] for r in runs]))
    entry["runs"] = runs
    return entry


def _key(entry: dict[str, Any]) -> tuple[str, str, int]:
    return entry["dataset"], entry["variant"], entry["bits"]


def merge_into(path: Path, entry: dict[str, Any], *, command: str) -> dict[str, Any]:
    """Merge one cell (summary's entry) into the file and return the cell as now stored.

    A cell of the same (dataset, variant, bits) with the same options and k keeps its runs of
    other seeds (a rerun of a seed replaces that run), so seeds can be added later; a cell with
    other options or k is replaced. Other cells are kept.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two studies (one per dataset) may write at once: they lock the folder, which outlives the
    # file's replacement by atomic_write and leaves no lock file behind.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        doc: dict[str, Any] = {"results": []}
        if path.is_file():
            doc = json.loads(path.read_text())
        old = [e for e in doc["results"] if _key(e) == _key(entry)]
        runs = {r["seed"]: r for r in entry["runs"]}
        if old and (old[0]["options"], old[0]["k"]) == (entry["options"], entry["k"]):
            runs = {**{r["seed"]: r for r in old[0]["runs"]}, **runs}
        k = None if entry["k"] == "grid" else entry["k"]
        merged = summary(
            dataset=entry["dataset"], variant=entry["variant"], n_bits=entry["bits"], k=k,
            runs=[runs[seed] for seed in sorted(runs)],
        )  # fmt: skip
        merged["options"] = entry["options"]  # as run (summary reads today's VARIANTS table)
        kept = [e for e in doc["results"] if _key(e) != _key(entry)]
        out = {
            "description": __doc__.splitlines()[0],
            "metric": "map@all on an outer validation fifth of the training part",
            "commands": list(dict.fromkeys([*doc.get("commands", []), command])),
            "results": sorted([*kept, merged], key=_key),
        }
        atomic_write(path, lambda f: f.write(json.dumps(out, indent=1).encode() + b"\n"))
    finally:
        os.close(folder)  # closing releases the lock
    return merged


def print_table(entries: list[dict[str, Any]]) -> None:
    """A plain mean(std) table of the entries run here (scripts print; the library logs)."""
    print(f"{'variant':24s} bits  i2t mean(std)     t2i mean(std)    kept epoch")
    for e in entries:
        print(
            f"{e['variant']:24s} {e['bits']:4d}  {e['i2t_mean']:.4f}({e['i2t_std']:.3f})"
            f"   {e['t2i_mean']:.4f}({e['t2i_std']:.3f})   {e['kept_epoch_mean']:.0f}"
        )


def main() -> None:
    """Run every (variant, bits, seed) asked for and merge the summaries into --json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--bits", default="64")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    p.add_argument("--k", default="grid", help='"grid" (K_GRID, chosen per run) or one k')
    p.add_argument("--json", type=Path, default=Path("docs/results/quality-study.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise InputError(f"expected variants from {', '.join(VARIANTS)}, got {unknown}")
    k = None if args.k == "grid" else int(args.k)
    bits = [int(b) for b in args.bits.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    defaults = dataclasses.asdict(TrainConfig())
    # (backbone, vocabulary, tokens, crops) -> data
    bases: dict[tuple[str, int, str, str], PairDataset] = {}
    command = (
        f"python -m scripts.quality_study --dataset {args.dataset} --root {args.root} "
        f"--bits {args.bits} --seeds {args.seeds} --k {args.k} --variants {args.variants}"
    )
    done = []
    for name in names:
        fields, weighting, backbone, vocab_size, tokens, crops = VARIANTS[name]
        inputs = (backbone, vocab_size, tokens, crops)
        if inputs not in bases:
            data = prepare(
                args.dataset,
                args.root,
                backbone=backbone,
                vocab_size=vocab_size,
                text_tokens=tokens,
            )
            bases[inputs] = with_crops(data, crops, backbone)
        row_k = fields.get("k", k)
        for n_bits in bits:
            runs = []
            for seed in seeds:
                data = weighted_text(outer_split(bases[inputs], seed), weighting)
                run = run_one(
                    data, fields={**defaults, **fields}, n_bits=n_bits, seed=seed, k=row_k
                )
                runs.append(run)
                row = {"dataset": args.dataset, "variant": name, "bits": n_bits, **run}
                print(json.dumps(row), flush=True)
            entry = summary(dataset=args.dataset, variant=name, n_bits=n_bits, k=row_k, runs=runs)
            # Each cell is written as soon as it is done; the table shows every seed stored.
            done.append(merge_into(args.json, entry, command=command))
    print_table(done)


if __name__ == "__main__":
    main()
