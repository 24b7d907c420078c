"""AUCMH training: one flat loop over batches (Algorithm 1), with selection on validation.

Over 400 lines because TrainConfig (every field checked), the loop and the epoch and k selection
that read its history are one procedure; the model itself lives in models/network/aucmh.py.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from common.errors import InputError
from evaluation.protocol import map_all, seeded_split, validation_map
from models.data.dataset import PairDataset
from models.devices import DEVICES, resolve_device
from models.features.short_text import short_rows
from models.network.aucmh import HashingModel, ModelConfig, build_model
from models.training.losses import (
    GRAPH_FUSIONS,
    anchor_graph_loss,
    contrastive_loss,
    fuse_graphs,
    graph_from_nearest,
    nearest_anchors,
    ranking_loss,
)

logger = logging.getLogger(__name__)

# Validation ranks the held-out pairs against the fitting pairs; a cap keeps that cheap on
# NUS-WIDE-sized training sets (a seeded sample of at most this many fitting pairs).
VAL_DATABASE_CAP = 20_000
# Points per chunk when finding every fitting point's nearest anchors (bounds the (chunk, m) block).
NEAREST_CHUNK = 2048


# The values of k that train_selecting tries by default (see TrainConfig.k).
K_GRID = (20, 100)
LR_SCHEDULES = ("constant", "cosine")  # TrainConfig.lr_schedule's choices

# The TrainConfig fields that say what network is trained: ModelConfig's, less the feature widths,
# which come from the data (TrainConfig.model_config).
NETWORK_FIELDS = tuple(
    f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("image_dim", "text_dim")
)
_NETWORK = ModelConfig()


@dataclass(frozen=True)
class TrainConfig:
    """How AUCMH is trained, and which network; `cmh train` flags map onto these fields one to one.

    The network fields (NETWORK_FIELDS) are ModelConfig's, with its defaults and checks, kept flat
    here so that every flag, sweep variant and `dataclasses.replace` names a field directly.
    """

    n_bits: int = _NETWORK.n_bits  # ModelConfig.n_bits: code length L, 16, 32, 64 or 128
    image_hidden: tuple[int, ...] = _NETWORK.image_hidden  # ModelConfig.image_hidden
    text_hidden: tuple[int, ...] = _NETWORK.text_hidden  # ModelConfig.text_hidden
    input_norm: str = _NETWORK.input_norm  # ModelConfig.input_norm: "zscore" or "l2"
    dropout: float = _NETWORK.dropout  # ModelConfig.dropout, after each hidden layer
    # Nearest anchors kept per point in S (Eq. 2). The best k depends on the data (Web News
    # validation wants 20, the demo 100, Wikipedia is flat), so `cmh train`, `cmh evaluate` and
    # the demo build train each of K_GRID and keep the best on validation (train_selecting).
    k: int = 20
    n_anchors: int = 4096  # m, anchors sampled once from the fitting pairs (capped at their count)
    beta: float = 0.8  # L = beta * L_g + (1 - beta) * L_r (Eq. 8); chosen on validation
    margin: float = 0.8  # gamma, the triplet margin of L_r (Eq. 7), 0 < gamma < 1; validation
    temperature: float = 1.0  # divides code cosines in Q (Eq. 5); 1 is the paper's form
    # How P joins the two modalities' graphs (losses.fuse_graphs): "mean" is the paper's Eq. 4;
    # "product" (near only where both graphs agree) is beyond the paper.
    graph_fusion: str = "mean"
    # The text graph's share of a "mean" P, (1 - w) G_image + w G_text: 0.5 is the paper's Eq. 4;
    # any other w is beyond it (a training setting, like graph_fusion).
    graph_text_weight: float = 0.5
    # Divides the hash layer's input during training, tanh(z / T) (1: the paper's form). The codes
    # are sign(z) whatever T, so only the straight-through gradient changes: a training setting,
    # and a checkpoint (or the serving text path) has nothing to store or reproduce for it.
    hash_temperature: float = 1.0
    lr: float = 3e-4  # Adam learning rate (paper: 1e-4; 3e-4 chosen on validation)
    # How lr moves over the epochs: "constant" (the paper's plain Adam) or "cosine" (annealed
    # from lr towards 0 at epoch `epochs`, stepped once per epoch; an option beyond the paper).
    lr_schedule: str = "constant"
    weight_decay: float = 0.0  # Adam L2 penalty on the MLP weights (0: none, as in the paper)
    batch_size: int = 256  # n, pairs per batch (paper: 256)
    epochs: int = 100  # most epochs to run (paper: about 100)
    patience: int = 20  # stop after this many epochs without a better validation MAP
    n_val: int = 2000  # pairs held out of train_idx for validation, at most a fifth of them
    seed: int = 0  # seeds the split, anchors, initial weights and batch order
    use_graph_loss: bool = True  # ablation switch: False drops L_g ("without L_g")
    use_ranking_loss: bool = True  # ablation switch: False drops L_r ("without L_r")
    use_hash_layer: bool = True  # ablation switch: False trains on continuous tanh codes
    # Beyond the paper (0: off, the paper's loss): L += contrastive_weight * an in-batch InfoNCE
    # of each pair against the batch's other pairs at contrastive_temperature (losses.py).
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    # Beyond the paper (0: off): short text views (issue 32). Each batch also hashes every pair's
    # text cut to 1..short_view_words of its words (models/features/short_text.py), and the loss
    # treats that view as the pair's text: L += short_view_weight * L(images, views), the same
    # mix of L_g (P from the whole pair) and L_r. Needs bag-of-words text (else ignored, logged).
    short_view_weight: float = 0.0
    short_view_words: int = 3
    # Beyond the paper (0: off): the kept epoch (and k) maximises the mean of validation i2t,
    # t2i and t2i with each validation caption cut to 1..val_short_words words (drawn once).
    val_short_words: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"

    def __post_init__(self) -> None:
        # ModelConfig checks the network fields (here with its default feature widths).
        self.model_config(image_dim=_NETWORK.image_dim, text_dim=_NETWORK.text_dim)
        checks = [
            (self.k >= 1, "k >= 1", self.k),
            (self.n_anchors >= 1, "n_anchors >= 1", self.n_anchors),
            (0.0 < self.beta < 1.0, "0 < beta < 1", self.beta),
            (0.0 < self.margin < 1.0, "0 < margin < 1", self.margin),
            (self.temperature > 0.0, "temperature > 0", self.temperature),
            (
                self.graph_fusion in GRAPH_FUSIONS,
                f"graph_fusion in {GRAPH_FUSIONS}",
                self.graph_fusion,
            ),
            (
                0.0 <= self.graph_text_weight <= 1.0
                and (self.graph_fusion == "mean" or self.graph_text_weight == 0.5),
                "0 <= graph_text_weight <= 1, and 0.5 unless graph_fusion is mean",
                self.graph_text_weight,
            ),
            (self.hash_temperature > 0.0, "hash_temperature > 0", self.hash_temperature),
            (self.lr > 0.0, "lr > 0", self.lr),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule in {LR_SCHEDULES}", self.lr_schedule),
            (self.weight_decay >= 0.0, "weight_decay >= 0", self.weight_decay),
            (self.batch_size >= 2, "batch_size >= 2", self.batch_size),
            (self.epochs >= 1, "epochs >= 1", self.epochs),
            (self.patience >= 1, "patience >= 1", self.patience),
            (self.n_val >= 1, "n_val >= 1", self.n_val),
            (self.contrastive_weight >= 0.0, "contrastive_weight >= 0", self.contrastive_weight),
            (
                self.contrastive_temperature > 0.0,
                "contrastive_temperature > 0",
                self.contrastive_temperature,
            ),
            (self.short_view_weight >= 0.0, "short_view_weight >= 0", self.short_view_weight),
            (self.short_view_words >= 1, "short_view_words >= 1", self.short_view_words),
            (self.val_short_words >= 0, "val_short_words >= 0", self.val_short_words),
            (self.use_graph_loss or self.use_ranking_loss, "at least one loss", "none"),
            (self.device in DEVICES, "device auto, cpu or cuda", self.device),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise InputError(f"expected {expected}, got {got!r}")

    def model_config(self, *, image_dim: int, text_dim: int) -> ModelConfig:
        """The network these settings train, for features of these widths."""
        network: dict[str, Any] = {name: getattr(self, name) for name in NETWORK_FIELDS}
        return ModelConfig(image_dim=image_dim, text_dim=text_dim, **network)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `dataclasses.asdict` output (lists back to tuples).

    Absent fields take today's defaults. Raises InputError on unknown fields or bad values.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"expected TrainConfig fields, got unknown {unknown}")
    fixed: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return TrainConfig(**fixed)


def split_train(train_idx: np.ndarray, *, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (fit_idx, val_idx) out of train_idx; val holds min(n_val, n_train // 5) pairs."""
    n = int(train_idx.size)
    n_held = min(n_val, n // 5)
    if n_held < 1 or n - n_held < 2:
        raise InputError(
            f"expected at least 10 training pairs to carve a validation split, got {n}"
        )
    return seeded_split(train_idx, n_held=n_held, seed=seed)


def _features(data: PairDataset) -> tuple[np.ndarray, np.ndarray]:
    if data.image_features is None or data.text_features is None:
        raise InputError(
            f"expected image and text features on dataset {data.name!r}, got "
            f"image={data.image_features is not None}, text={data.text_features is not None}"
        )
    return data.image_features, data.text_features


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


def validation_score(row: dict[str, float]) -> float:
    """What an epoch is chosen by: the mean of its validation MAPs (i2t, t2i, and the short
    queries' t2i when TrainConfig.val_short_words asked for them)."""
    keys = [k for k in ("val_i2t", "val_t2i", "val_t2i_short") if k in row]
    return sum(row[k] for k in keys) / len(keys)


def best_epoch(history: list[dict[str, float]]) -> dict[str, float]:
    """The epoch train keeps: the row with the best validation_score.

    The earliest such row on ties. Only trained epochs are rows, so the untrained weights
    (epoch 0) are never kept. train decides with this function, and every report reads it.
    """
    if not history:
        raise InputError("expected a training history with at least one epoch, got none")
    return max(history, key=validation_score)


def best_validation_map(history: list[dict[str, float]]) -> float:
    """The validation_score of the kept epoch (best_epoch)."""
    return validation_score(best_epoch(history))


def with_k_grid(cfg: TrainConfig, ks: Sequence[int] = K_GRID) -> list[TrainConfig]:
    """One candidate config per k, otherwise equal to cfg; just cfg without the graph loss.

    k only shapes the anchor graph, so without L_g every candidate would train the same model.
    """
    if not cfg.use_graph_loss:
        return [cfg]
    return [dataclasses.replace(cfg, k=k) for k in dict.fromkeys(ks)]


def train_selecting(
    *,
    candidates: Sequence[TrainConfig],
    data: PairDataset,
    progress: bool = False,
    processes: int = 1,
) -> tuple[HashingModel, list[dict[str, float]], TrainConfig]:
    """Train every candidate config and keep the one with the best validation MAP.

    Candidates share one seed, hence one validation split (held out of train_idx, never the
    queries): the split the trainer picks its epoch on picks the candidate too, as each baseline
    picks its regulariser in `cmh evaluate`. Returns (model, its history, its config).
    processes > 1 trains up to that many candidates at once, each in its own process
    (`_train_in_processes`): the same runs bit for bit, in less wall time when the cores allow.
    """
    if not candidates:
        raise InputError("expected at least one candidate TrainConfig, got none")
    if processes < 1:
        raise InputError(f"expected processes >= 1, got {processes}")
    seeds = sorted({c.seed for c in candidates})
    if len(seeds) != 1:
        raise InputError(f"expected candidates sharing one seed, got seeds {seeds}")
    if processes > 1 and len(candidates) > 1:
        trained = _train_in_processes(candidates, data, processes)
    else:
        trained = [train(cfg=c, data=data, progress=progress) for c in candidates]
    runs = [(model, history, c) for (model, history), c in zip(trained, candidates, strict=True)]
    scores = [best_validation_map(history) for _, history, _ in runs]
    best = int(np.argmax(scores))
    logger.info(
        "validation score by candidate: %s; kept k=%d, its epoch %d",
        ", ".join(f"k={c.k}: {v:.4f}" for (_, _, c), v in zip(runs, scores, strict=True)),
        runs[best][2].k,
        best_epoch(runs[best][1])["epoch"],
    )
    return runs[best]


def _train_in_processes(
    candidates: Sequence[TrainConfig], data: PairDataset, processes: int
) -> list[tuple[HashingModel, list[dict[str, float]]]]:
    """train() of each candidate in a spawned worker process, in candidate order.

    Each worker runs torch on this process's intra-op thread count, so it computes exactly what
    train() here would (tests/test_train.py compares the weights bit for bit); spawned, not
    forked, because a fork after torch's OpenMP threads started can hang.
    """
    context = multiprocessing.get_context("spawn")
    workers = min(processes, len(candidates))
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=torch.set_num_threads,
        initargs=(torch.get_num_threads(),),
    ) as pool:  # fmt: skip
        return list(pool.map(_train_one, candidates, [data] * len(candidates)))


def _train_one(cfg: TrainConfig, data: PairDataset) -> tuple[HashingModel, list[dict[str, float]]]:
    """train() without a progress bar (a worker process's entry)."""
    return train(cfg=cfg, data=data)


def train(
    *, cfg: TrainConfig, data: PairDataset, progress: bool = False
) -> tuple[HashingModel, list[dict[str, float]]]:
    """Train AUCMH on data.train_idx; return the kept model (eval mode) and per-epoch history.

    A validation split is carved out of train_idx (never the queries); after each epoch the
    validation MAP (both directions) is logged, and the weights of best_epoch(history) are
    returned. History rows: epoch, loss, loss_graph, loss_rank, val_i2t, val_t2i, seconds.
    """
    image, text = _features(data)
    device = resolve_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    fit_idx, val_idx = split_train(data.train_idx, n_val=cfg.n_val, seed=cfg.seed)
    val_db = fit_idx
    if val_db.size > VAL_DATABASE_CAP:
        val_db = np.sort(rng.choice(fit_idx, VAL_DATABASE_CAP, replace=False))

    model = build_model(cfg.model_config(image_dim=image.shape[1], text_dim=text.shape[1]))
    model.fit_statistics(image[fit_idx], text[fit_idx])
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # None for "constant": the optimizer alone, exactly as before schedules existed.
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
        if cfg.lr_schedule == "cosine"
        else None
    )

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

    words_known = data.vocabulary is not None  # short views cut words: bag-of-words text only
    if (cfg.short_view_weight > 0 or cfg.val_short_words > 0) and not words_known:
        logger.warning("%s has no bag-of-words text: no short text views", data.name)
    normalised = data.text_weighting == "tfidf"
    view_rng = np.random.default_rng([cfg.seed, 32])  # apart from rng: the same batches as before
    val_short = None
    if cfg.val_short_words > 0 and words_known and data.labels.shape[1] > 0:
        short_rng = np.random.default_rng([cfg.seed, 33])
        n_words = short_rng.integers(1, cfg.val_short_words + 1, size=val_idx.size)
        val_short = short_rows(text[val_idx], n_words, short_rng, normalised=normalised)

    def short_t2i() -> float:
        assert val_short is not None
        return map_all(
            model.encode_text(val_short), model.encode_image(image[val_db]),
            data.labels[val_idx], data.labels[val_db], real_valued=False, seed=cfg.seed,
        )  # fmt: skip

    def paper_loss(
        hi: torch.Tensor, ht: torch.Tensor, p: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L, L_g, L_r) of image codes hi against text codes ht (Eq. 8, or an ablation's one
        loss alone: the other is zero); p is P (Eq. 4), None without the graph loss."""
        zero = hi.new_zeros(())
        loss_g = zero if p is None else anchor_graph_loss(hi, ht, p, temperature=cfg.temperature)
        loss_r = ranking_loss(hi, ht, margin=cfg.margin) if cfg.use_ranking_loss else zero
        if cfg.use_graph_loss and cfg.use_ranking_loss:
            return cfg.beta * loss_g + (1 - cfg.beta) * loss_r, loss_g, loss_r
        return loss_g + loss_r, loss_g, loss_r

    def evaluate() -> tuple[float, float]:
        model.eval()  # encoding needs eval mode; the next epoch switches back to training
        if data.labels.shape[1] == 0:  # no labels (a user's own pairs): each validation pair's
            # own partner is its one relevant item, so the kept epoch still means something
            own = np.arange(val_idx.size)
            return validation_map(
                model, image=image[val_idx], text=text[val_idx],
                labels=np.eye(val_idx.size, dtype=np.uint8), query_idx=own, db_idx=own,
                seed=cfg.seed,
            )  # fmt: skip
        return validation_map(
            model, image=image, text=text, labels=data.labels,
            query_idx=val_idx, db_idx=val_db, seed=cfg.seed,
        )  # fmt: skip

    logger.info("epoch 0 (untrained): mean validation MAP %.4f", sum(evaluate()) / 2)
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict[str, float]] = []
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
            hi = model.hash_image(xi, binary=cfg.use_hash_layer, temperature=cfg.hash_temperature)
            ht = model.hash_text(xt, binary=cfg.use_hash_layer, temperature=cfg.hash_temperature)
            p: torch.Tensor | None = None
            if cfg.use_graph_loss:
                rows = torch.as_tensor(position[batch], device=device)
                p = fuse_graphs(
                    graph_from_nearest(near_image[0][rows], near_image[1][rows], m=m),
                    graph_from_nearest(near_text[0][rows], near_text[1][rows], m=m),
                    fusion=cfg.graph_fusion,
                    text_weight=cfg.graph_text_weight,
                )  # (n, n), Eq. 4
            loss, loss_g, loss_r = paper_loss(hi, ht, p)
            if cfg.contrastive_weight > 0.0:
                loss = loss + cfg.contrastive_weight * contrastive_loss(
                    hi, ht, temperature=cfg.contrastive_temperature
                )
            if cfg.short_view_weight > 0.0 and words_known:
                n_words = view_rng.integers(1, cfg.short_view_words + 1, size=batch.size)
                view = short_rows(text[batch], n_words, view_rng, normalised=normalised)
                hv = model.hash_text(
                    torch.as_tensor(view, dtype=torch.float32, device=device),
                    binary=cfg.use_hash_layer,
                    temperature=cfg.hash_temperature,
                )
                loss = loss + cfg.short_view_weight * paper_loss(hi, hv, p)[0]
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            sums += [loss.item(), loss_g.item(), loss_r.item()]
        if scheduler is not None:
            scheduler.step()
        seconds = time.perf_counter() - start
        i2t, t2i = evaluate()
        mean_loss, mean_g, mean_r = (float(v) for v in sums / len(batches))
        history.append(
            {
                "epoch": float(epoch), "loss": mean_loss, "loss_graph": mean_g,
                "loss_rank": mean_r, "val_i2t": i2t, "val_t2i": t2i, "seconds": seconds,
            }
        )  # fmt: skip
        if val_short is not None:
            history[-1]["val_t2i_short"] = short_t2i()
        logger.info(
            "epoch %d: loss %.4f (L_g %.4f, L_r %.4f) | val MAP i2t %.4f t2i %.4f | %.1fs",
            epoch, mean_loss, mean_g, mean_r, i2t, t2i, seconds,
        )  # fmt: skip
        kept = best_epoch(history)
        if kept is history[-1]:
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - kept["epoch"] >= cfg.patience:
            logger.info("no better validation MAP for %d epochs: stopping", cfg.patience)
            break
    model.load_state_dict(best_state)
    model.eval()
    kept = best_epoch(history)
    # A candidate's best epoch, not yet what is kept: train_selecting keeps one candidate.
    logger.info(
        "k=%d: best epoch %d, validation score %.4f",
        cfg.k, kept["epoch"], best_validation_map(history),
    )  # fmt: skip
    return model, history
