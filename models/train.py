"""AUCMH training: one flat loop over batches (Algorithm 1), with selection on validation."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.errors import InputError
from evaluation.metrics import mean_average_precision
from models.aucmh import INPUT_NORMS, HashingModel
from models.data import PairDataset
from models.losses import anchor_graph_loss, graph_from_nearest, nearest_anchors, ranking_loss

logger = logging.getLogger(__name__)

# Validation ranks the held-out pairs against the fitting pairs; a cap keeps that cheap on
# NUS-WIDE-sized training sets (a seeded sample of at most this many fitting pairs).
VAL_DATABASE_CAP = 20_000
# Points per chunk when finding every fitting point's nearest anchors (bounds the (chunk, m) block).
NEAREST_CHUNK = 2048


# The values of k that train_selecting tries by default (see TrainConfig.k).
K_GRID = (20, 100)


@dataclass(frozen=True)
class TrainConfig:
    """Every AUCMH training setting; `cmh train` flags map onto these fields one to one."""

    n_bits: int = 64  # code length L: 16, 32, 64 or 128
    # Hidden widths of each MLP (its depth); 2048 chosen on Wikipedia and Web News validation.
    image_hidden: tuple[int, ...] = (2048,)
    text_hidden: tuple[int, ...] = (2048,)
    input_norm: str = "zscore"  # feature scaling before the MLPs: "zscore" or "l2" (aucmh.py)
    # Dropout after each hidden layer: the paper has none; 0.3 chosen on validation (it lifts
    # image-to-text, where the image MLP otherwise overfits a few thousand pairs).
    dropout: float = 0.3
    # Nearest anchors kept per point in S (Eq. 2). The best k depends on the data (Web News
    # validation wants 20, the demo 100, Wikipedia is flat), so `cmh train`, `cmh evaluate` and
    # the demo build train each of K_GRID and keep the best on validation (train_selecting).
    k: int = 20
    n_anchors: int = 4096  # m, anchors sampled once from the fitting pairs (capped at their count)
    beta: float = 0.8  # L = beta * L_g + (1 - beta) * L_r (Eq. 8); chosen on validation
    margin: float = 0.8  # gamma, the triplet margin of L_r (Eq. 7), 0 < gamma < 1; validation
    temperature: float = 1.0  # divides code cosines in Q (Eq. 5); 1 is the paper's form
    lr: float = 3e-4  # Adam learning rate (paper: 1e-4; 3e-4 chosen on validation)
    weight_decay: float = 0.0  # Adam L2 penalty on the MLP weights (0: none, as in the paper)
    batch_size: int = 256  # n, pairs per batch (paper: 256)
    epochs: int = 100  # most epochs to run (paper: about 100)
    patience: int = 20  # stop after this many epochs without a better validation MAP
    n_val: int = 2000  # pairs held out of train_idx for validation, at most a fifth of them
    seed: int = 0  # seeds the split, anchors, initial weights and batch order
    use_graph_loss: bool = True  # ablation switch: False drops L_g ("without L_g")
    use_ranking_loss: bool = True  # ablation switch: False drops L_r ("without L_r")
    use_hash_layer: bool = True  # ablation switch: False trains on continuous tanh codes
    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"

    def __post_init__(self) -> None:
        checks = [
            (self.n_bits in (16, 32, 64, 128), "n_bits in {16, 32, 64, 128}", self.n_bits),
            (all(w >= 1 for w in self.image_hidden), "positive image_hidden", self.image_hidden),
            (all(w >= 1 for w in self.text_hidden), "positive text_hidden", self.text_hidden),
            (self.input_norm in INPUT_NORMS, f"input_norm in {INPUT_NORMS}", self.input_norm),
            (0.0 <= self.dropout < 1.0, "0 <= dropout < 1", self.dropout),
            (self.k >= 1, "k >= 1", self.k),
            (self.n_anchors >= 1, "n_anchors >= 1", self.n_anchors),
            (0.0 < self.beta < 1.0, "0 < beta < 1", self.beta),
            (0.0 < self.margin < 1.0, "0 < margin < 1", self.margin),
            (self.temperature > 0.0, "temperature > 0", self.temperature),
            (self.lr > 0.0, "lr > 0", self.lr),
            (self.weight_decay >= 0.0, "weight_decay >= 0", self.weight_decay),
            (self.batch_size >= 2, "batch_size >= 2", self.batch_size),
            (self.epochs >= 1, "epochs >= 1", self.epochs),
            (self.patience >= 1, "patience >= 1", self.patience),
            (self.n_val >= 1, "n_val >= 1", self.n_val),
            (self.use_graph_loss or self.use_ranking_loss, "at least one loss", "none"),
            (self.device in ("auto", "cpu", "cuda"), "device auto, cpu or cuda", self.device),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise InputError(f"expected {expected}, got {got!r}")


# Fields added after checkpoints were first written, with the value those checkpoints were
# trained with: an older config lacking them must rebuild the same network, not today's default.
ABSENT_IN_OLDER_CHECKPOINTS: dict[str, Any] = {"input_norm": "zscore", "dropout": 0.0}


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `dataclasses.asdict` output (lists back to tuples).

    Raises InputError on unknown or missing-but-required fields or bad values.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"expected TrainConfig fields, got unknown {unknown}")
    fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return TrainConfig(**{**ABSENT_IN_OLDER_CHECKPOINTS, **fixed})


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without CUDA is an InputError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("expected a CUDA device for device='cuda', got none available")
    return torch.device(name)


def split_train(train_idx: np.ndarray, *, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (fit_idx, val_idx) out of train_idx; val holds min(n_val, n_train // 5) pairs."""
    n = int(train_idx.size)
    n_held = min(n_val, n // 5)
    if n_held < 1 or n - n_held < 2:
        raise InputError(
            f"expected at least 10 training pairs to carve a validation split, got {n}"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(train_idx[order[n_held:]]), np.sort(train_idx[order[:n_held]])


def _features(data: PairDataset) -> tuple[np.ndarray, np.ndarray]:
    if data.image_features is None or data.text_features is None:
        raise InputError(
            f"expected image and text features on dataset {data.name!r}, got "
            f"image={data.image_features is not None}, text={data.text_features is not None}"
        )
    return data.image_features, data.text_features


def evaluate_split(
    model: HashingModel,
    *,
    image: np.ndarray,
    text: np.ndarray,
    labels: np.ndarray,
    query_idx: np.ndarray,
    db_idx: np.ndarray,
    seed: int,
) -> tuple[float, float]:
    """(image-to-text MAP, text-to-image MAP) of `model` with query_idx against db_idx."""
    qi, qt = model.encode_image(image[query_idx]), model.encode_text(text[query_idx])
    di, dt = model.encode_image(image[db_idx]), model.encode_text(text[db_idx])
    ql, dl = labels[query_idx], labels[db_idx]
    return (
        mean_average_precision(qi, dt, ql, dl, seed=seed),
        mean_average_precision(qt, di, ql, dl, seed=seed),
    )


def nearest_for_rows(
    x: np.ndarray, rows: np.ndarray, anchors: torch.Tensor, *, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """nearest_anchors (cosines, indices), each (len(rows), k), for x[rows], in chunks."""
    values, indices = [], []
    with torch.no_grad():
        for start in range(0, rows.size, NEAREST_CHUNK):
            chunk = torch.as_tensor(
                x[rows[start : start + NEAREST_CHUNK]], dtype=torch.float32, device=anchors.device
            )
            v, i = nearest_anchors(chunk, anchors, k=k)
            values.append(v)
            indices.append(i)
    return torch.cat(values), torch.cat(indices)


def best_epoch(history: list[dict[str, float]]) -> dict[str, float]:
    """The history row with the best mean of the two validation MAPs (the epoch train keeps)."""
    if not history:
        raise InputError("expected a training history with at least one epoch, got none")
    return max(history, key=lambda row: row["val_i2t"] + row["val_t2i"])


def best_validation_map(history: list[dict[str, float]]) -> float:
    """The best mean of the two validation MAPs over a training history."""
    row = best_epoch(history)
    return (row["val_i2t"] + row["val_t2i"]) / 2


def build_model(cfg: TrainConfig, *, image_dim: int, text_dim: int) -> HashingModel:
    """The untrained network `cfg` describes, for features of these widths."""
    return HashingModel(
        image_dim=image_dim,
        text_dim=text_dim,
        n_bits=cfg.n_bits,
        image_hidden=cfg.image_hidden,
        text_hidden=cfg.text_hidden,
        input_norm=cfg.input_norm,
        dropout=cfg.dropout,
    )


def with_k_grid(cfg: TrainConfig, ks: Sequence[int] = K_GRID) -> list[TrainConfig]:
    """One candidate config per k, otherwise equal to cfg; just cfg without the graph loss.

    k only shapes the anchor graph, so without L_g every candidate would train the same model.
    """
    if not cfg.use_graph_loss:
        return [cfg]
    return [dataclasses.replace(cfg, k=k) for k in dict.fromkeys(ks)]


def train_selecting(
    *, candidates: Sequence[TrainConfig], data: PairDataset, progress: bool = False
) -> tuple[HashingModel, list[dict[str, float]], TrainConfig]:
    """Train every candidate config and keep the one with the best validation MAP.

    Candidates share one seed, hence one validation split (held out of train_idx, never the
    queries): the split the trainer picks its epoch on picks the candidate too, as each baseline
    picks its regulariser in `cmh evaluate`. Returns (model, its history, its config).
    """
    if not candidates:
        raise InputError("expected at least one candidate TrainConfig, got none")
    seeds = sorted({c.seed for c in candidates})
    if len(seeds) != 1:
        raise InputError(f"expected candidates sharing one seed, got seeds {seeds}")
    runs = [(*train(cfg=c, data=data, progress=progress), c) for c in candidates]
    scores = [best_validation_map(history) for _, history, _ in runs]
    best = int(np.argmax(scores))
    logger.info(
        "validation MAP by candidate: %s; kept %s",
        ", ".join(f"k={c.k}: {v:.4f}" for (_, _, c), v in zip(runs, scores, strict=True)),
        f"k={runs[best][2].k}",
    )
    return runs[best]


def train(
    *, cfg: TrainConfig, data: PairDataset, progress: bool = False
) -> tuple[HashingModel, list[dict[str, float]]]:
    """Train AUCMH on data.train_idx; return the best-validation model and per-epoch history.

    A validation split is carved out of train_idx (never the queries); after each epoch the
    validation MAP (both directions) is logged, and the weights of the epoch with the best mean
    are returned. History rows: epoch, loss, loss_graph, loss_rank, val_i2t, val_t2i, seconds.
    """
    image, text = _features(data)
    device = resolve_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    fit_idx, val_idx = split_train(data.train_idx, n_val=cfg.n_val, seed=cfg.seed)
    val_db = fit_idx
    if val_db.size > VAL_DATABASE_CAP:
        val_db = np.sort(rng.choice(fit_idx, VAL_DATABASE_CAP, replace=False))

    model = build_model(cfg, image_dim=image.shape[1], text_dim=text.shape[1])
    model.fit_statistics(image[fit_idx], text[fit_idx])
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # Anchors: m fitting pairs, sampled once before training (Algorithm 1, step 2). A point's
    # column of S (Eq. 2) depends only on the point and the fixed anchors, so it is found once
    # here rather than in every batch of every epoch: the same P, at O(N k) memory.
    anchor_idx = rng.choice(fit_idx, min(cfg.n_anchors, fit_idx.size), replace=False)
    m = int(anchor_idx.size)
    position = np.full(len(data), -1, dtype=np.int64)
    position[fit_idx] = np.arange(fit_idx.size)
    if cfg.use_graph_loss:
        near_image = nearest_for_rows(
            image,
            fit_idx,
            torch.as_tensor(image[anchor_idx], dtype=torch.float32, device=device),
            k=cfg.k,
        )
        near_text = nearest_for_rows(
            text,
            fit_idx,
            torch.as_tensor(text[anchor_idx], dtype=torch.float32, device=device),
            k=cfg.k,
        )
    logger.info(
        "training AUCMH n_bits=%d on %d pairs (%d held out for validation, %d anchors) on %s",
        cfg.n_bits, fit_idx.size, val_idx.size, m, device,
    )  # fmt: skip

    def evaluate() -> tuple[float, float]:
        return evaluate_split(
            model, image=image, text=text, labels=data.labels,
            query_idx=val_idx, db_idx=val_db, seed=cfg.seed,
        )  # fmt: skip

    best = sum(evaluate()) / 2
    logger.info("epoch 0 (untrained): mean validation MAP %.4f", best)
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, history = 0, []
    for epoch in tqdm(range(1, cfg.epochs + 1), desc="epochs", disable=not progress):
        start = time.perf_counter()
        model.train()
        sums = np.zeros(3)
        order = rng.permutation(fit_idx)
        batches = [order[i : i + cfg.batch_size] for i in range(0, order.size, cfg.batch_size)]
        batches = [b for b in batches if b.size >= 2]  # a 1-pair batch has no triplets
        for batch in batches:
            xi = torch.as_tensor(image[batch], dtype=torch.float32, device=device)
            xt = torch.as_tensor(text[batch], dtype=torch.float32, device=device)
            hi = model.hash_image(xi, binary=cfg.use_hash_layer)
            ht = model.hash_text(xt, binary=cfg.use_hash_layer)
            zero = hi.new_zeros(())
            loss_g, loss_r = zero, zero
            if cfg.use_graph_loss:
                rows = torch.as_tensor(position[batch], device=device)
                p = 0.5 * (
                    graph_from_nearest(near_image[0][rows], near_image[1][rows], m=m)
                    + graph_from_nearest(near_text[0][rows], near_text[1][rows], m=m)
                )  # (n, n), Eq. 4
                loss_g = anchor_graph_loss(hi, ht, p, temperature=cfg.temperature)
            if cfg.use_ranking_loss:
                loss_r = ranking_loss(hi, ht, margin=cfg.margin)
            if cfg.use_graph_loss and cfg.use_ranking_loss:
                loss = cfg.beta * loss_g + (1 - cfg.beta) * loss_r
            else:
                loss = loss_g + loss_r  # one of them is zero: the ablation keeps the other alone
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            sums += [loss.item(), loss_g.item(), loss_r.item()]
        seconds = time.perf_counter() - start
        i2t, t2i = evaluate()
        mean_loss, mean_g, mean_r = (float(v) for v in sums / len(batches))
        history.append(
            {
                "epoch": float(epoch), "loss": mean_loss, "loss_graph": mean_g,
                "loss_rank": mean_r, "val_i2t": i2t, "val_t2i": t2i, "seconds": seconds,
            }
        )  # fmt: skip
        logger.info(
            "epoch %d: loss %.4f (L_g %.4f, L_r %.4f) | val MAP i2t %.4f t2i %.4f | %.1fs",
            epoch, mean_loss, mean_g, mean_r, i2t, t2i, seconds,
        )  # fmt: skip
        if (i2t + t2i) / 2 > best:
            best, best_epoch = (i2t + t2i) / 2, epoch
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= cfg.patience:
            logger.info("no better validation MAP for %d epochs: stopping", cfg.patience)
            break
    model.load_state_dict(best_state)
    model.eval()
    logger.info("kept epoch %d: mean validation MAP %.4f", best_epoch, best)
    return model, history
