"""AUCMH ablations on the validation split (never the queries): the paper's Table 5 variants.

For each code length, variant (full, without L_r, without L_g, without the hash layer) and seed,
train with TrainConfig defaults (plus overrides; k chosen on validation from K_GRID as in
`cmh evaluate`, unless k is set) and record the validation MAP of the kept epoch in
both directions; print one JSON line per run and a mean/std summary line per variant.

Usage: python -m scripts.ablate_aucmh --dataset wikipedia \
    --root ../shared/data/wikipedia --bits 16,32,64 --seeds 0,1,2 [--set k=100 --set beta=0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

from models.features.pipeline import prepare
from models.training.train import (
    TrainConfig,
    best_epoch,
    config_from_dict,
    train_selecting,
    with_k_grid,
)

VARIANTS: dict[str, dict[str, bool]] = {
    "AUCMH": {},
    "without L_r": {"use_ranking_loss": False},
    "without L_g": {"use_graph_loss": False},
    "without hash layer": {"use_hash_layer": False},
}


def _override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key, json.loads(value)


def main() -> None:
    """Run every (bits, variant, seed) and print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--bits", default="16,32,64")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], type=_override, help="field=json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    data = prepare(args.dataset, args.root)
    base = dataclasses.asdict(TrainConfig())
    overrides = dict(args.set)
    base.update(overrides)
    for bits in (int(b) for b in args.bits.split(",")):
        for name in args.variants.split(","):
            rows = []
            for seed in (int(s) for s in args.seeds.split(",")):
                cfg = config_from_dict({**base, **VARIANTS[name], "n_bits": bits, "seed": seed})
                # As `cmh evaluate` does: k chosen on validation from K_GRID unless --set k=...
                candidates = [cfg] if "k" in overrides else with_k_grid(cfg)
                _, history, chosen = train_selecting(candidates=candidates, data=data)
                best = best_epoch(history)
                row = {"bits": bits, "variant": name, "seed": seed, "k": chosen.k,
                       "epoch": best["epoch"], "i2t": best["val_i2t"], "t2i": best["val_t2i"]}  # fmt: skip
                rows.append(row)
                sys.stdout.write(json.dumps(row) + "\n")
                sys.stdout.flush()
            summary = {"bits": bits, "variant": name, "seeds": len(rows)}
            for key in ("i2t", "t2i"):
                values = [r[key] for r in rows]
                summary[f"{key}_mean"] = statistics.mean(values)
                summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            sys.stdout.write(json.dumps({"summary": summary}) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
