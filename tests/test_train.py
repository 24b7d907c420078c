"""AUCMH training on small synthetic separable data: it learns, validates and refuses bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import models.training.train
from cli.main import main
from common.errors import InputError
from evaluation.protocol import validation_map
from models.data.dataset import PairDataset
from models.network.aucmh import HashingModel, ModelConfig
from models.network.checkpoint import load_checkpoint
from models.training.train import (
    K_GRID,
    TrainConfig,
    best_epoch,
    best_validation_map,
    config_from_dict,
    split_train,
    train,
    train_selecting,
    with_k_grid,
)
from tests.helpers import separable_pairs

SMALL = TrainConfig(
    n_bits=16, image_hidden=(64,), text_hidden=(64,), k=5, n_anchors=200, batch_size=64,
    epochs=8, patience=8, n_val=100, lr=1e-3, seed=0, device="cpu",
)  # fmt: skip


@pytest.fixture(scope="module")
def data() -> PairDataset:
    return separable_pairs()


@pytest.fixture(scope="module")
def trained(data: PairDataset) -> tuple[HashingModel, list[dict[str, float]]]:
    return train(cfg=SMALL, data=data)


def _query_map(model: HashingModel, data: PairDataset) -> float:
    assert data.image_features is not None and data.text_features is not None
    i2t, t2i = validation_map(
        model, image=data.image_features, text=data.text_features, labels=data.labels,
        query_idx=data.query_idx, db_idx=data.database_idx, seed=0,
    )  # fmt: skip
    return (i2t + t2i) / 2


def test_short_run_beats_the_untrained_model(data, trained) -> None:
    model, history = trained
    torch.manual_seed(0)
    untrained = HashingModel(
        image_dim=40, text_dim=25, n_bits=16, image_hidden=(64,), text_hidden=(64,)
    ).eval()
    assert data.image_features is not None and data.text_features is not None
    untrained.fit_statistics(
        data.image_features[data.train_idx], data.text_features[data.train_idx]
    )
    before, after = _query_map(untrained, data), _query_map(model, data)
    assert after > before + 0.2, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]


def test_history_has_one_row_per_epoch_with_finite_values(trained) -> None:
    _, history = trained
    assert [row["epoch"] for row in history] == [float(e) for e in range(1, 9)]
    keys = {"epoch", "loss", "loss_graph", "loss_rank", "val_i2t", "val_t2i", "seconds"}
    for row in history:
        assert set(row) == keys
        assert all(np.isfinite(v) for v in row.values())


@pytest.mark.parametrize(
    "switch", ["use_graph_loss", "use_ranking_loss", "use_hash_layer"], ids=lambda s: s
)
def test_ablations_train(data, switch: str) -> None:
    cfg = dataclasses.replace(SMALL, epochs=2, **{switch: False})
    model, history = train(cfg=cfg, data=data)
    assert len(history) == 2
    if switch == "use_graph_loss":
        assert all(row["loss_graph"] == 0.0 for row in history)
    if switch == "use_ranking_loss":
        assert all(row["loss_rank"] == 0.0 for row in history)
    if switch == "use_hash_layer":  # continuous codes in training: other losses than sign's
        _, with_layer = train(cfg=dataclasses.replace(cfg, use_hash_layer=True), data=data)
        assert [row["loss"] for row in history] != [row["loss"] for row in with_layer]
    codes = model.encode_text(np.zeros((2, 25), dtype=np.float32))
    assert set(np.unique(codes)) <= {-1, 1}


def test_training_is_seeded(data) -> None:
    cfg = dataclasses.replace(SMALL, epochs=1)
    a, _ = train(cfg=cfg, data=data)
    b, _ = train(cfg=cfg, data=data)
    assert data.image_features is not None
    assert np.array_equal(a.encode_image(data.image_features), b.encode_image(data.image_features))


def test_validation_split_is_inside_train_and_disjoint() -> None:
    train_idx = np.arange(50, 150, dtype=np.int64)
    fit, val = split_train(train_idx, n_val=2000, seed=3)
    assert val.size == 20 and fit.size == 80
    assert np.intersect1d(fit, val).size == 0
    assert set(fit) | set(val) == set(train_idx)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_bits", 24),
        ("beta", 1.0),
        ("margin", 0.0),
        ("k", 0),
        ("temperature", 0.0),
        ("weight_decay", -1e-4),
        ("dropout", 1.0),
        ("input_norm", "minmax"),
        ("graph_fusion", "max"),
        ("graph_text_weight", 1.5),
    ],
)
def test_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(InputError, match=f"expected .*got {value!r}"):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_config_rejects_no_loss_and_round_trips() -> None:
    with pytest.raises(InputError, match="at least one loss"):
        TrainConfig(use_graph_loss=False, use_ranking_loss=False)
    with pytest.raises(InputError, match="0.5 unless graph_fusion is mean"):
        TrainConfig(graph_fusion="product", graph_text_weight=0.7)
    assert config_from_dict(dataclasses.asdict(SMALL)) == SMALL
    with pytest.raises(InputError, match="unknown"):
        config_from_dict({"n_bitz": 16})


def test_train_config_names_its_network_with_model_config_fields_and_defaults() -> None:
    network = SMALL.model_config(image_dim=40, text_dim=25)
    assert network == ModelConfig(
        image_dim=40, text_dim=25, n_bits=16, image_hidden=(64,), text_hidden=(64,),
        input_norm=SMALL.input_norm, dropout=SMALL.dropout,
    )  # fmt: skip
    # Defaults live in ModelConfig once: a default TrainConfig trains the default network.
    default = ModelConfig()
    assert TrainConfig().model_config(image_dim=default.image_dim, text_dim=default.text_dim) == (
        default
    )


def _history(*means: float) -> list[dict[str, float]]:
    return [
        {"epoch": float(e), "val_i2t": m + 0.1, "val_t2i": m - 0.1}
        for e, m in enumerate(means, start=1)
    ]


def test_best_epoch_keeps_the_best_mean_the_earliest_on_ties() -> None:
    assert best_epoch(_history(0.3, 0.5, 0.4))["epoch"] == 2
    assert best_epoch(_history(0.3, 0.5, 0.5, 0.2))["epoch"] == 2  # a tie keeps the earlier
    # The mean of both directions decides, not either one alone.
    rows = [
        {"epoch": 1.0, "val_i2t": 0.9, "val_t2i": 0.1},
        {"epoch": 2.0, "val_i2t": 0.6, "val_t2i": 0.5},
    ]
    assert best_epoch(rows)["epoch"] == 2 and best_validation_map(rows) == pytest.approx(0.55)
    with pytest.raises(InputError, match="at least one epoch, got none"):
        best_epoch([])


def _scripted_validation(monkeypatch, means: list[float]) -> None:
    """Make train's validation MAPs (epoch 0 first) the given means, in order."""
    scores = iter(means)

    def scripted(model, **_: object) -> tuple[float, float]:
        mean = next(scores)
        return mean, mean

    monkeypatch.setattr(models.training.train, "validation_map", scripted)


def test_train_keeps_the_epoch_best_epoch_names_never_the_untrained_weights(
    data, monkeypatch
) -> None:
    # Epoch 0 (the untrained weights) validates best; best_epoch only ranks trained epochs, and
    # train must return the weights of the epoch it names (2), not the untrained ones.
    cfg = dataclasses.replace(SMALL, epochs=4, patience=10)
    _scripted_validation(monkeypatch, [0.9, 0.1, 0.3, 0.2, 0.25])
    model, history = train(cfg=cfg, data=data)
    assert best_epoch(history)["epoch"] == 2 and len(history) == 4
    _scripted_validation(monkeypatch, [0.0, 0.1, 0.3])  # any rule keeps epoch 2 of 2 here
    after_two, _ = train(cfg=dataclasses.replace(cfg, epochs=2), data=data)
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_two.state_dict()[name]), name
    assert not model.training


def test_patience_counts_from_the_kept_epoch(data, monkeypatch) -> None:
    cfg = dataclasses.replace(SMALL, epochs=8, patience=2)
    _scripted_validation(monkeypatch, [0.9, 0.1, 0.3, 0.2, 0.25, 0.8, 0.8, 0.8, 0.8])
    _, history = train(cfg=cfg, data=data)
    assert len(history) == 4 and best_epoch(history)["epoch"] == 2  # stopped 2 epochs after 2


def test_selection_keeps_the_candidate_with_the_best_validation_map(data, trained) -> None:
    # Candidates differ in k only; each is trained exactly as train() alone would train it.
    candidates = with_k_grid(SMALL, (5, 1, 5))
    assert [c.k for c in candidates] == [5, 1]  # repeats dropped, order kept
    model, history, chosen = train_selecting(candidates=candidates, data=data)
    other = train(cfg=candidates[1], data=data)[1]
    scores = {5: best_validation_map(trained[1]), 1: best_validation_map(other)}
    assert chosen.k == max(scores, key=lambda k: scores[k])

    def untimed(rows: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert untimed(history) == untimed(trained[1] if chosen.k == 5 else other)
    assert _query_map(model, data) > 0
    assert with_k_grid(SMALL) == [dataclasses.replace(SMALL, k=k) for k in K_GRID]
    no_graph = dataclasses.replace(SMALL, use_graph_loss=False)
    assert with_k_grid(no_graph) == [no_graph]  # k only shapes the graph: one model is enough


def test_selection_in_processes_trains_the_same_models_bit_for_bit(data) -> None:
    """Two spawned workers (one per k) against train() here: the same kept model, weights and
    history (timings aside), so `--train-processes` changes the wall time only."""
    candidates = with_k_grid(SMALL, (5, 1))
    here = train_selecting(candidates=candidates, data=data)
    apart = train_selecting(candidates=candidates, data=data, processes=2)
    assert apart[2] == here[2]

    def untimed(rows: list[dict[str, float]]) -> list[dict[str, float]]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert untimed(apart[1]) == untimed(here[1])
    mine, theirs = here[0].state_dict(), apart[0].state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[key], theirs[key]) for key in mine)
    assert not apart[0].training  # returned ready to encode, as train() returns it
    with pytest.raises(InputError, match="expected processes >= 1, got 0"):
        train_selecting(candidates=candidates, data=data, processes=0)


def test_selection_refuses_no_candidates_and_mixed_seeds(data) -> None:
    with pytest.raises(InputError, match="at least one candidate"):
        train_selecting(candidates=[], data=data)
    mixed = [SMALL, dataclasses.replace(SMALL, seed=1)]
    with pytest.raises(
        InputError, match=r"expected candidates sharing one seed, got seeds \[0, 1\]"
    ):
        train_selecting(candidates=mixed, data=data)


def test_train_needs_features(data) -> None:
    bare = dataclasses.replace(data, image_features=None)
    with pytest.raises(InputError, match="expected image and text features"):
        train(cfg=SMALL, data=bare)


@pytest.mark.slow
def test_short_run_on_demo_beats_untrained(demo_data: PairDataset) -> None:
    cfg = dataclasses.replace(SMALL, image_hidden=(256,), text_hidden=(256,), k=20, epochs=20)
    model, _ = train(cfg=cfg, data=demo_data)
    assert demo_data.image_features is not None and demo_data.text_features is not None
    torch.manual_seed(0)
    untrained = HashingModel(
        image_dim=demo_data.image_features.shape[1], text_dim=demo_data.text_features.shape[1],
        n_bits=16, image_hidden=(256,), text_hidden=(256,),
    ).eval()  # fmt: skip
    untrained.fit_statistics(
        demo_data.image_features[demo_data.train_idx], demo_data.text_features[demo_data.train_idx]
    )
    before, after = _query_map(untrained, demo_data), _query_map(model, demo_data)
    assert after > before + 0.1, (before, after)


def test_cli_train_writes_a_loadable_checkpoint(
    wikipedia_root: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "w16.pt"
    code = main(
        ["train", "--dataset", "wikipedia", "--root", str(wikipedia_root), "--bits", "16",
         "--out", str(out), "--epochs", "2", "--image-hidden", "64", "--text-hidden", "",
         "--k", "50"]
    )  # fmt: skip
    assert code == 0
    assert f"out={out}" in capsys.readouterr().out
    ckpt = load_checkpoint(out)
    assert ckpt.n_bits == 16 and ckpt.dataset == "wikipedia" and len(ckpt.history) == 2
    assert ckpt.model_config.image_hidden == (64,) and ckpt.model_config.text_hidden == ()
    assert config_from_dict(ckpt.train_config).k == 50
    assert ckpt.image_backbone == "sift-bovw-128" and ckpt.vocabulary is None


def test_cli_train_chooses_k_on_validation(wikipedia_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "w16.pt"
    code = main(
        ["train", "--dataset", "wikipedia", "--root", str(wikipedia_root), "--bits", "16",
         "--out", str(out), "--epochs", "2", "--image-hidden", "32", "--text-hidden", "",
         "--k", "3,30"]
    )  # fmt: skip
    assert code == 0
    ckpt = load_checkpoint(out)
    printed = capsys.readouterr().out
    k = config_from_dict(ckpt.train_config).k
    assert k in (3, 30) and f"k={k}" in printed
    best = best_epoch(ckpt.history)
    assert f"best_epoch={int(best['epoch'])}" in printed
    assert f"val_i2t={round(best['val_i2t'], 4)}" in printed


@pytest.mark.parametrize("ks", ["", "20,x"])
def test_cli_train_bad_k_list_exits_2(tmp_path: Path, capsys, ks: str) -> None:
    # argparse rejects it while parsing: exit 2 with the usage line and the message.
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "demo", "--root", str(tmp_path), "--out", "x.pt", "--k", ks])
    assert exc.value.code == 2
    assert f"expected k or comma-separated ks like 20,100, got {ks!r}" in capsys.readouterr().err


def test_cli_train_bad_setting_exits_2(tmp_path: Path, capsys) -> None:
    code = main(
        ["train", "--dataset", "demo", "--root", str(tmp_path), "--out", str(tmp_path / "x.pt"),
         "--beta", "1.5"]
    )  # fmt: skip
    assert code == 2
    assert "cmh train: error: expected 0 < beta < 1, got 1.5" in capsys.readouterr().err
