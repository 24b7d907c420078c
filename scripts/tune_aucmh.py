"""Validation sweep: AUCMH variants against the baselines, never looking at the query set.

An outer validation split is held out of the dataset's training part (seeded, a fifth of it).
Every method trains on the rest exactly as `cmh evaluate` would train it on the whole training
part (AUCMH carves its own epoch-selection split inside, the baselines their regulariser split),
and is scored with the held-out pairs as queries against the rest as database. The queries of the
dataset's protocol are not used at all, so settings chosen from this table are chosen on
validation only.

    python -m scripts.tune_aucmh --dataset wikipedia --root ../shared/data/wikipedia \
        --bits 16,32,64 --seeds 0,1 --variants '{"base": {}, "l2": {"input_norm": "l2"}}' \
        --baselines cmfh,cca-itq,cca --json sweep.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.protocol import Encoder, validation_map, validation_split
from models.data.dataset import PairDataset
from models.features.pipeline import prepare
from models.methods.compare import METHODS, features
from models.training.train import TrainConfig, config_from_dict, train

OUTER_SEED_OFFSET = 1000  # the outer split's seed differs from every inner split's seed


def outer_split(data: PairDataset, seed: int) -> PairDataset:
    """The dataset with a fifth of its training part as queries and the rest as train = db."""
    fit, val = validation_split(data.train_idx, fraction=0.2, seed=OUTER_SEED_OFFSET + seed)
    return dataclasses.replace(data, train_idx=fit, query_idx=val, database_idx=fit)


def score(data: PairDataset, model: Encoder, name: str, bits: int, seed: int) -> dict[str, Any]:
    image, text = features(data)
    real = METHODS[name].real_valued if name in METHODS else False
    i2t, t2i = validation_map(
        model, image=image, text=text, labels=data.labels, query_idx=data.query_idx,
        db_idx=data.database_idx, real_valued=real, seed=seed,
    )  # fmt: skip
    return {"method": name, "bits": bits, "seed": seed, "i2t": i2t, "t2i": t2i}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--bits", default="16,32,64")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--variants", default='{"base": {}}', help="JSON: name -> TrainConfig fields")
    p.add_argument("--baselines", default="", help="comma-separated baseline method names")
    p.add_argument("--json", type=Path, help="append result rows to this JSON-lines file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bits = [int(b) for b in args.bits.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants: dict[str, dict[str, object]] = json.loads(args.variants)
    defaults = dataclasses.asdict(TrainConfig())
    base = prepare(args.dataset, args.root)
    rows = []
    for seed in seeds:
        data = outer_split(base, seed)
        for name in [b for b in args.baselines.split(",") if b]:
            for n_bits in bits[:1] if METHODS[name].real_valued else bits:
                row = score(data, METHODS[name].fit(data, n_bits, seed), name, n_bits, seed)
                rows.append(row)
                print(json.dumps(row), flush=True)
        for vname, fields in variants.items():
            for n_bits in bits:
                start = time.perf_counter()
                cfg = config_from_dict({**defaults, **fields, "n_bits": n_bits, "seed": seed})
                model, history = train(cfg=cfg, data=data)
                row = score(data, model, vname, n_bits, seed)
                row["epochs"] = len(history)
                row["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with args.json.open("a") as f:
            for row in rows:
                f.write(json.dumps({"dataset": args.dataset, **row}) + "\n")
    table: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        table[(row["method"], row["bits"])].append((row["i2t"], row["t2i"]))
    print(f"{'method':24s} bits  i2t mean(std)     t2i mean(std)")
    for (name, n_bits), vals in table.items():
        a = np.array(vals)
        print(f"{name:24s} {n_bits:4d}  {a[:, 0].mean():.4f}({a[:, 0].std():.3f})"
              f"   {a[:, 1].mean():.4f}({a[:, 1].std():.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
