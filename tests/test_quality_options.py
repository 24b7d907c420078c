"""The training options beyond the paper (issue 17): defaults train today's model, options change it.

Also the quality study's own pieces: its text weightings and its merge of result files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.errors import InputError
from models.data.dataset import PairDataset
from models.data.loaders import load_dataset
from models.features.image import BACKBONES, DEFAULT_BACKBONE, encode_images, load_backbone
from models.features.pipeline import DEFAULT_VOCAB_SIZE
from models.features.text import WEIGHTINGS
from models.methods.compare import METHODS, RIDGE_GRID, choose_widening, parse_methods
from models.network.aucmh import HashingModel, hash_layer
from models.training.losses import contrastive_loss
from models.training.train import TrainConfig, config_from_dict, train
from scripts.quality_study import (
    CROPS,
    VARIANTS,
    Variant,
    count_matrix,
    merge_into,
    summary,
    ten_crop_features,
    weighted_text,
    with_crops,
)
from tests.helpers import separable_pairs

# A short seeded run: the same settings as test_train's SMALL, over 4 epochs.
SHORT = TrainConfig(
    n_bits=16, image_hidden=(64,), text_hidden=(64,), k=5, n_anchors=200, batch_size=64,
    epochs=4, patience=4, n_val=100, lr=1e-3, seed=0, device="cpu",
)  # fmt: skip

# SHORT's history (less seconds) and weights, recorded with models/training/train.py as it was before
# these options existed (torch BEFORE_TORCH, CPU, one thread): the defaults must reproduce them.
BEFORE_HISTORY = [
    (6.54027373450143, 7.810569626944406, 1.4590898241315569, 0.772136551019761, 0.8810483174252322),
    (6.067636694226946, 7.323608875274658, 1.043747799737113, 0.9847234584818417, 0.992614686718496),
    (5.859113284519741, 7.096487317766462, 0.9096170493534633, 0.9970966921607713, 0.9998081175465091),
    (5.684456757136753, 6.895365170070103, 0.8408232416425433, 0.999584776348309, 0.9999730651430851),
]  # fmt: skip
BEFORE_TORCH = "2.14.1+cu130"
# SHORT's weights as the defaults train them, saved when the hash recorded with the history
# (2f4f5b7b...) stopped matching on another CPU (AVX512 kernels) while the history still matched
# bit for bit: compared within float32 rounding, not by hash, so the CPU's kernels do not matter.
WEIGHTS = Path(__file__).parent / "data" / "short-run-weights.npz"
KEYS = ("loss", "loss_graph", "loss_rank", "val_i2t", "val_t2i")


@pytest.fixture(scope="module")
def data() -> PairDataset:
    return separable_pairs()


Run = tuple[HashingModel, list[dict[str, float]]]


@pytest.fixture(scope="module")
def default_run(data: PairDataset) -> Run:
    return train(cfg=SHORT, data=data)


def _rows(history: list[dict[str, float]]) -> list[tuple[float, ...]]:
    return [tuple(row[k] for k in KEYS) for row in history]


def _assert_weights_close(model: torch.nn.Module) -> None:
    saved = np.load(WEIGHTS)
    state = model.state_dict()
    assert sorted(state) == sorted(saved.files)
    for name, value in state.items():
        np.testing.assert_allclose(value.detach().cpu().numpy(), saved[name], rtol=1e-5, atol=1e-6)


def test_defaults_reproduce_the_training_from_before_the_options(default_run: Run) -> None:
    model, history = default_run
    assert SHORT.lr_schedule == "constant" and SHORT.hash_temperature == 1.0
    _assert_weights_close(model)
    # Recorded bit for bit on one CPU; other CPUs' kernels round otherwise (an AMD EPYC with AVX2
    # only: 1.2e-8 relative in epoch 4's loss, the same torch), another torch more: within 1e-7
    # relative with torch BEFORE_TORCH, 1e-5 with another.
    rel = 1e-7 if torch.__version__ == BEFORE_TORCH else 1e-5
    assert _rows(history) == [pytest.approx(row, rel=rel) for row in BEFORE_HISTORY]


def test_cosine_schedule_changes_training_from_the_second_epoch(
    data: PairDataset, default_run: Run
) -> None:
    _, constant = default_run
    _, cosine = train(cfg=dataclasses.replace(SHORT, lr_schedule="cosine"), data=data)
    # Stepped once per epoch, after it: epoch 1 runs at the full lr, later ones lower.
    assert _rows(cosine)[0] == _rows(constant)[0]
    assert all(a != b for a, b in zip(_rows(cosine)[1:], _rows(constant)[1:], strict=True))


def test_hash_temperature_changes_training(data: PairDataset, default_run: Run) -> None:
    _, default = default_run
    for t in (0.5, 2.0):
        _, history = train(cfg=dataclasses.replace(SHORT, hash_temperature=t), data=data)
        assert _rows(history)[0][:3] != _rows(default)[0][:3], t  # losses differ from epoch 1


def test_hash_temperature_shapes_gradients_never_codes() -> None:
    # Why it is a TrainConfig field: codes are sign(z) whatever T, so a checkpoint, its serving
    # text path and every index built from it are the same; only the STE gradient moves.
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grads = []
    for t in (0.25, 1.0, 4.0):
        codes = hash_layer(z, temperature=t)
        assert torch.equal(codes, torch.where(z > 0, 1.0, -1.0))
        (grad,) = torch.autograd.grad((codes * torch.arange(16.0)).sum(), z)
        grads.append(grad)
    assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[1], grads[2])
    warm, hot = (hash_layer(z, binary=False, temperature=t) for t in (1.0, 4.0))
    assert not torch.allclose(warm, hot)  # without the sign, T changes the training codes


def test_contrastive_weight_changes_training(data: PairDataset, default_run: Run) -> None:
    _, default = default_run
    _, history = train(cfg=dataclasses.replace(SHORT, contrastive_weight=0.5), data=data)
    # The term joins the total loss only: L_g and L_r of the first batch are the same functions
    # of the same start, so the epoch-1 totals differ by the term (positive) and later epochs
    # differ everywhere as the weights move apart.
    assert _rows(history)[0][0] > _rows(default)[0][0]
    assert all(a != b for a, b in zip(_rows(history)[1:], _rows(default)[1:], strict=True))


def test_contrastive_loss_is_infonce_on_code_cosines() -> None:
    g = torch.Generator().manual_seed(0)
    hi, ht = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    t = 0.3
    c = (hi / hi.norm(dim=1, keepdim=True)) @ (ht / ht.norm(dim=1, keepdim=True)).T / t
    by_hand = -0.5 * (
        (c.diagonal() - c.logsumexp(dim=1)).mean() + (c.diagonal() - c.logsumexp(dim=0)).mean()
    )
    assert contrastive_loss(hi, ht, temperature=t).item() == pytest.approx(by_hand.item(), 1e-6)
    # Paired codes that agree score lower than the same codes paired at random.
    aligned = contrastive_loss(hi, hi + 0.1 * ht, temperature=t)
    shuffled = contrastive_loss(hi, (hi + 0.1 * ht)[torch.randperm(8, generator=g)], temperature=t)
    assert aligned < shuffled


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr_schedule", "step"), ("hash_temperature", 0.0), ("hash_temperature", -1.0),
        ("contrastive_weight", -0.1), ("contrastive_temperature", 0.0),
    ],
)  # fmt: skip
def test_options_refuse_bad_values(field: str, value: object) -> None:
    with pytest.raises(InputError, match=f"expected {field}.*got {value!r}"):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_train_configs_saved_before_the_options_rebuild_with_todays_behaviour() -> None:
    # A checkpoint's "train_config" record from before has neither field: they take the defaults.
    old = dataclasses.asdict(SHORT)
    del old["lr_schedule"], old["hash_temperature"]
    del old["contrastive_weight"], old["contrastive_temperature"]
    assert config_from_dict(old) == SHORT


def test_every_study_variant_is_a_valid_config() -> None:
    # The reference row is the defaults, untouched: no fields, binary text, Lite0, 2,000 words.
    assert VARIANTS["aucmh"] == Variant({}, "binary", DEFAULT_BACKBONE, DEFAULT_VOCAB_SIZE)
    for variant in VARIANTS.values():
        config_from_dict(variant.fields)
        assert variant.backbone in BACKBONES and variant.weighting in WEIGHTINGS
        assert variant.crops in CROPS


def test_pooled_crops_average_the_backbone_features_of_each_images_crops(
    tiny_demo_root: Path, tmp_path: Path
) -> None:
    data = load_dataset("demo", tiny_demo_root)
    assert data.image_paths is not None
    crops = ten_crop_features(data, DEFAULT_BACKBONE, tmp_path)
    backbone = load_backbone(DEFAULT_BACKBONE)
    assert crops.shape == (len(data.image_paths), 10, backbone.dim)
    # The centre crop is what the pipeline computes; the corners and mirrors are other views.
    centre = encode_images(backbone, data.image_paths)
    cosine = (crops[:, 4] * centre).sum(1) / np.linalg.norm(crops[:, 4], axis=1)
    assert (cosine / np.linalg.norm(centre, axis=1)).min() > 0.99999
    assert not np.allclose(crops[:, 0], crops[:, 4]) and not np.allclose(crops[:, 9], crops[:, 4])
    (cached,) = tmp_path.glob("demo-*-ten-crops-*.npy")
    assert np.array_equal(np.load(cached), crops)
    assert np.array_equal(ten_crop_features(data, DEFAULT_BACKBONE, tmp_path), crops)
    featured = dataclasses.replace(data, image_features=centre)
    assert with_crops(featured, "centre", DEFAULT_BACKBONE, tmp_path) is featured
    flip = with_crops(featured, "flip", DEFAULT_BACKBONE, tmp_path).image_features
    assert flip is not None and np.allclose(flip, (crops[:, 4] + crops[:, 9]) / 2)
    with pytest.raises(InputError, match="expected image files to crop"):
        ten_crop_features(separable_pairs(), DEFAULT_BACKBONE, tmp_path)


def _texts_dataset() -> PairDataset:
    texts = ["apple apple pear", "pear plum", "plum plum plum apple", "kiwi"]
    idx = np.arange(4, dtype=np.int64)
    return PairDataset(
        name="texts", ids=[str(i) for i in idx], labels=np.eye(4, dtype=np.uint8),
        train_idx=idx[:3], query_idx=idx[3:], database_idx=idx[:3],
        image_features=np.ones((4, 2), dtype=np.float32),
        text_features=np.zeros((4, 3), dtype=np.float32), texts=texts,
        vocabulary=["apple", "pear", "plum"],
    )  # fmt: skip


def test_text_weightings() -> None:
    data = _texts_dataset()
    assert data.texts is not None and data.vocabulary is not None
    counts = count_matrix(data.texts, data.vocabulary)
    assert counts.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 3], [0, 0, 0]]
    assert weighted_text(data, "binary") is data
    log = weighted_text(data, "log").text_features
    assert log is not None and np.allclose(log, np.log1p(counts))
    tfidf = weighted_text(data, "tfidf").text_features
    assert tfidf is not None
    # idf from the 3 fitting texts only (each word in 2 of them): equal idf, so rows are unit
    # counts; the text with no known word stays zero.
    expected = counts[:3] / np.linalg.norm(counts[:3], axis=1, keepdims=True)
    assert np.allclose(tfidf[:3], expected) and not tfidf[3].any()
    with pytest.raises(InputError, match="expected a text weighting"):
        weighted_text(data, "bm25")
    with pytest.raises(InputError, match="expected raw texts .* got text features only"):
        weighted_text(dataclasses.replace(data, texts=None), "log")


def _cell(variant: str, seed: int, i2t: float, **options: object) -> dict[str, Any]:
    run = {"seed": seed, "i2t": i2t, "t2i": i2t, "kept_epoch": 10}
    entry = summary(dataset="d", variant=variant, n_bits=64, k=20, runs=[run])
    return {**entry, "options": {**entry["options"], **options}}


def test_merge_adds_seeds_to_a_cell_and_keeps_the_other_cells(tmp_path: Path) -> None:
    path = tmp_path / "study.json"
    merge_into(path, _cell("aucmh", 0, 0.1), command="first")
    merge_into(path, _cell("cosine", 0, 0.2), command="first")
    merged = merge_into(path, _cell("aucmh", 1, 0.3), command="second")
    assert merged["seeds"] == [0, 1] and merged["i2t_mean"] == pytest.approx(0.2)
    merge_into(path, _cell("aucmh", 1, 0.5), command="second")  # a seed run again replaces it
    doc = json.loads(path.read_text())
    assert [(e["variant"], e["seeds"], e["i2t_mean"]) for e in doc["results"]] == [
        ("aucmh", [0, 1], pytest.approx(0.3)),
        ("cosine", [0], 0.2),
    ]
    assert doc["commands"] == ["first", "second"]
    # A cell run with other options is a new measurement: it replaces the old runs.
    merge_into(path, _cell("aucmh", 2, 0.9, epochs=5), command="third")
    (cell,) = [e for e in json.loads(path.read_text())["results"] if e["variant"] == "aucmh"]
    assert cell["seeds"] == [2] and cell["i2t_mean"] == 0.9


def test_a_choice_on_the_grid_edge_widens_the_grid_until_it_is_inside() -> None:
    calls: list[float] = []

    def score(value: float) -> float:  # a single peak at 1e4, past RIDGE_GRID's top edge (10)
        calls.append(value)
        return -abs(float(np.log10(value)) - 4.0)

    best, tried = choose_widening(score, RIDGE_GRID)
    assert best == pytest.approx(1e4)
    assert [v for v, _ in tried] == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5])
    assert len(calls) == len(tried)  # each value scored once
    below, tried = choose_widening(lambda v: -v, (1.0, 10.0, 100.0), max_extensions=2)
    assert below == pytest.approx(0.01) and len(tried) == 5  # stops at the limit, still on the edge
    inside, tried = choose_widening(lambda v: -abs(v - 1.0), RIDGE_GRID)
    assert inside == 1.0 and len(tried) == len(RIDGE_GRID)  # an inside choice adds nothing
    with pytest.raises(InputError, match="expected an ascending grid"):
        choose_widening(score, (1.0, 1.0))


def _hard_pairs() -> PairDataset:
    """separable_pairs drowned in noise: no epoch is perfect, so options change the kept model."""
    data = separable_pairs(n=150)
    assert data.image_features is not None and data.text_features is not None
    rng = np.random.default_rng(1)
    return dataclasses.replace(
        data,
        image_features=data.image_features + rng.random(data.image_features.shape, np.float32),
        text_features=data.text_features + rng.random(data.text_features.shape, np.float32),
    )


@pytest.fixture(scope="module")
def reference_codes() -> np.ndarray:
    hard = _hard_pairs()
    assert hard.image_features is not None
    return METHODS["aucmh"].fit(hard, 16, 0).encode_image(hard.image_features)


@pytest.mark.parametrize(
    "name", ["aucmh-cosine", "aucmh-hash-t2", "aucmh-tfidf-search-graph-text-0.8"]
)
def test_each_option_is_a_method_row_that_trains_another_model(
    name: str, reference_codes: np.ndarray
) -> None:
    hard = _hard_pairs()
    assert hard.image_features is not None
    codes = METHODS[name].fit(hard, 16, 0).encode_image(hard.image_features)
    assert parse_methods(name)[0].name == name  # `cmh evaluate --methods NAME` runs it
    assert not np.array_equal(codes, reference_codes)
