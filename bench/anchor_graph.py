"""Benchmark: AUCMH's per-batch anchor graph against a full N x N graph over the training set.

Inputs are synthesised at the paper's dimensions (4096-d non-negative "fc7" image features,
1386-d sparse binary bag-of-words text). Each measurement runs in a fresh subprocess so that its
peak resident memory (ru_maxrss) is its own; the memory a variant needs is its peak minus the
process's peak just before it starts (after the inputs exist).

- anchor: P for every batch of an epoch as in the paper (Eq. 2-4: m anchors, k nearest, W, G).
  Its cost per batch does not depend on N, so the epoch time is the median batch time times the
  number of batches (`measured_batches` are timed; the rest is that multiplication).
  The script also splits that work as models.training.train does it: each point's nearest anchors once
  (`cached_once_s`, `cached_mib` computed as N k (4 + 8) bytes per modality), then per batch only
  W and G (`cached_epoch_s`).
- full: a first-order k-nearest-neighbour cosine graph over all N training pairs for each
  modality, row-normalised and averaged into one dense N x N float32 P (the graph that full-graph
  methods build once, O(N^2 d) time, O(N^2) space); a batch then reads P[B][:, B]. Row blocks
  are computed and timed; with `full_rows` < N only that many rows are computed and the time is
  scaled by N / full_rows, and the memory is then N^2 * 4 bytes (computed, not measured).
- step: one training step of the model (forward, both losses, backward, Adam) without the graph,
  for the per-epoch totals.

Usage: python -m bench.anchor_graph --n 20015 [--full-rows N] [--threads 2]
Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from models.network.aucmh import HashingModel
from models.training.losses import (
    anchor_graph_loss,
    graph_from_nearest,
    nearest_anchors,
    pair_affinity,
    ranking_loss,
)

IMAGE_DIM, TEXT_DIM = 4096, 1386


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _synth(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 4096) non-negative sparse-ish image features and (n, 1386) binary BoW text."""
    image = torch.relu(torch.randn(n, IMAGE_DIM, generator=gen))
    text = (torch.rand(n, TEXT_DIM, generator=gen) < 0.01).float()
    return image, text


def bench_anchor(
    n: int, *, m: int, k: int, batch: int, measured: int, seed: int
) -> dict[str, float]:
    """Time and peak memory of the per-batch anchor graph (batches synthesised on the fly)."""
    gen = torch.Generator().manual_seed(seed)
    image_anchors, text_anchors = _synth(m, gen)
    batches = [_synth(batch, gen) for _ in range(measured)]
    before = _peak_mib()
    times, near_times = [], []
    for xi, xt in batches:
        start = time.perf_counter()
        p = pair_affinity(xi, xt, image_anchors, text_anchors, k=k)
        times.append(time.perf_counter() - start)
        assert p.shape == (batch, batch)
        # The same P split in two: nearest anchors (once per point in models.training.train) ...
        start = time.perf_counter()
        near_i = nearest_anchors(xi, image_anchors, k=k)
        near_t = nearest_anchors(xt, text_anchors, k=k)
        mid = time.perf_counter()
        # ... and the per-batch part that remains: W and G from the cached rows.
        graph_from_nearest(*near_i, m=m)
        graph_from_nearest(*near_t, m=m)
        near_times.append((mid - start, time.perf_counter() - mid))
    n_batches = -(-n // batch)
    per_batch = statistics.median(times)
    nearest_s = statistics.median(t[0] for t in near_times)
    graph_s = statistics.median(t[1] for t in near_times)
    return {
        "per_batch_s": per_batch,
        "epoch_s": per_batch * n_batches,
        "batches_per_epoch": n_batches,
        "measured_batches": measured,
        "peak_extra_mib": _peak_mib() - before,
        "anchor_features_mib": (image_anchors.numel() + text_anchors.numel()) * 4 / 2**20,
        "cached_once_s": nearest_s * n_batches,
        "cached_epoch_s": graph_s * n_batches,
        "cached_mib": n * k * 2 * (4 + 8) / 2**20,  # values float32 + indices int64, 2 modalities
    }


def _knn_rows(x_rows: torch.Tensor, x_all: torch.Tensor, k: int) -> torch.Tensor:
    """Row-normalised k-nearest-neighbour cosine rows (rows, N) of unit-norm inputs, >= 0."""
    sims = x_rows @ x_all.T
    top, idx = sims.topk(k, dim=1)
    rows = torch.zeros_like(sims).scatter_(1, idx, top.clamp_min(0.0))
    return rows / rows.sum(dim=1, keepdim=True).clamp_min(1e-12)


def bench_full(n: int, *, rows: int, k: int, batch: int, block: int, seed: int) -> dict[str, float]:
    """Time and peak memory of the dense full graph (first `rows` rows when rows < n)."""
    gen = torch.Generator().manual_seed(seed)
    image, text = _synth(n, gen)
    # Normalised in place: cosines need nothing else, and a second copy would double the inputs.
    image.div_(image.norm(dim=1, keepdim=True).clamp_min(1e-12))
    text.div_(text.norm(dim=1, keepdim=True).clamp_min(1e-12))
    before = _peak_mib()
    start = time.perf_counter()
    p = torch.empty(rows, n)  # the graph itself: N x N float32 when rows == n
    for lo in range(0, rows, block):
        hi = min(lo + block, rows)
        p[lo:hi] = 0.5 * (_knn_rows(image[lo:hi], image, k) + _knn_rows(text[lo:hi], text, k))
    build = time.perf_counter() - start
    result = {
        "rows_computed": rows,
        "build_s_measured": build,
        "build_s": build * n / rows,
        "graph_mib": n * n * 4 / 2**20,
        "extrapolated": float(rows < n),
    }
    if rows == n:
        idx = torch.randperm(n, generator=gen)[:batch]
        start = time.perf_counter()
        for _ in range(20):
            sub = p[idx][:, idx]
            sub = sub / sub.sum(dim=1, keepdim=True).clamp_min(1e-12)
        result["per_batch_lookup_s"] = (time.perf_counter() - start) / 20
        result["peak_extra_mib"] = _peak_mib() - before
    return result


def bench_step(
    *, batch: int, k: int, m: int, hidden: int, n_bits: int, seed: int
) -> dict[str, float]:
    """Median time of one training step without the graph (model, both losses, Adam)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = HashingModel(
        image_dim=IMAGE_DIM, text_dim=TEXT_DIM, n_bits=n_bits,
        image_hidden=(hidden,), text_hidden=(hidden,),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    xi, xt = _synth(batch, gen)
    ai, at = _synth(m, gen)
    p = pair_affinity(xi, xt, ai, at, k=k)
    times = []
    for _ in range(12):
        start = time.perf_counter()
        hi, ht = model.hash_image(xi), model.hash_text(xt)
        loss = 0.5 * anchor_graph_loss(hi, ht, p) + 0.5 * ranking_loss(hi, ht, margin=0.3)
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
        times.append(time.perf_counter() - start)
    return {"per_batch_s": statistics.median(times[2:])}


def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.child == "anchor":
        out = bench_anchor(
            args.n, m=args.m, k=args.k, batch=args.batch, measured=args.measured, seed=0
        )
    elif args.child == "full":
        rows = min(args.full_rows or args.n, args.n)
        out = bench_full(args.n, rows=rows, k=args.k, batch=args.batch, block=1024, seed=0)
    else:
        out = bench_step(batch=args.batch, k=args.k, m=args.m, hidden=1024, n_bits=64, seed=0)
    sys.stdout.write(json.dumps({"variant": args.child, "n": args.n, **out}) + "\n")


def main() -> None:
    """Run each variant in its own subprocess and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, required=True, help="training pairs N")
    parser.add_argument("--m", type=int, default=4096, help="anchors")
    parser.add_argument("--k", type=int, default=100, help="nearest anchors / neighbours")
    parser.add_argument("--batch", type=int, default=256, help="batch size n")
    parser.add_argument("--measured", type=int, default=20, help="anchor batches timed")
    parser.add_argument("--full-rows", type=int, default=0, help="rows of the full graph built")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--variants", default="anchor,full,step", help="which to run")
    parser.add_argument("--child", choices=("anchor", "full", "step"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    common = [
        f"--n={args.n}", f"--m={args.m}", f"--k={args.k}", f"--batch={args.batch}",
        f"--measured={args.measured}", f"--full-rows={args.full_rows}", f"--threads={args.threads}",
    ]  # fmt: skip
    for variant in args.variants.split(","):
        subprocess.run([sys.executable, __file__, *common, f"--child={variant}"], check=True)


if __name__ == "__main__":
    main()
