"""`cmh evaluate` and its parts: the method loop, the results JSON, the table and the plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from cli.evaluate import parse_bits
from cli.main import main
from common.errors import InputError
from evaluation.metrics import (
    average_precisions,
    hamming_distances,
    mean_curve,
    partner_ranks,
    radius_curves,
    ranked_scores,
    relevance,
)
from evaluation.protocol import (
    QUERY_BLOCK,
    score_direction,
    score_run,
    seeded_split,
    validation_map,
    validation_split,
)
from evaluation.report import (
    OTHER_METRICS,
    format_other_metrics,
    format_table,
    plot_pr_curves,
    results_document,
)
from models.data.dataset import PairDataset
from models.methods.compare import evaluate_methods, parse_methods
from models.training.train import split_train


def synthetic_dataset(n: int = 300, n_classes: int = 3) -> PairDataset:
    """Separable pairs with a 60-query split; database = train = the rest."""
    rng = np.random.default_rng(0)
    classes = rng.integers(0, n_classes, size=n)
    latent = rng.normal(scale=3.0, size=(n_classes, 4))[classes] + rng.normal(size=(n, 4))
    image = latent @ rng.normal(size=(4, 12)) + 0.3 * rng.normal(size=(n, 12))
    text = latent @ rng.normal(size=(4, 6)) + 0.3 * rng.normal(size=(n, 6))
    rest = np.arange(60, n, dtype=np.int64)
    return PairDataset(
        name="synthetic",
        ids=[str(i) for i in range(n)],
        labels=np.eye(n_classes, dtype=np.uint8)[classes],
        train_idx=rest,
        query_idx=np.arange(60, dtype=np.int64),
        database_idx=rest,
        image_features=image.astype(np.float32),
        text_features=text.astype(np.float32),
    )


def test_evaluate_methods_gives_one_result_per_method_bits_and_seed(tmp_path: Path) -> None:
    data = synthetic_dataset()
    methods = parse_methods("cvh,cmfh,cca-itq,lsh,cca")
    results = evaluate_methods(data, methods=methods, bits=[8, 16], seeds=[0, 1])
    assert len(results) == 5 * 2 * 2
    for seed in (0, 1):  # one fit per seed, repeated for every length
        cca = [r for r in results if r.method == "cca" and r.seed == seed]
        assert len(cca) == 2 and len({(r.i2t.map_all, r.t2i.map_all) for r in cca}) == 1
    for r in results:
        assert 0.45 < r.i2t.map_all <= 1.0 and 0.45 < r.t2i.map_all <= 1.0  # random: about 1/3
    doc = results_document(results, dataset="synthetic", n_query=60, n_database=240)
    assert set(doc) == {"dataset", "protocol", "results"}
    assert doc["protocol"] == {
        "queries": 60,
        "database": 240,
        "metric": "map@all",
        "seeds": [0, 1],
        "other_metrics": dict(OTHER_METRICS),
    }
    # The first keys stay (other code reads them); the other metrics come per direction.
    assert set(doc["results"][0]) == {
        "method", "bits", "seed", "scoring", "i2t_map", "t2i_map", "i2t", "t2i",
    }  # fmt: skip
    names = ["map@r", "p@1", "p@10", "p@100", "r@1", "r@10", "r@100"]
    names += ["instance-r@1", "instance-r@5", "instance-r@10"]
    for row in doc["results"]:
        for direction in ("i2t", "t2i"):
            assert list(row[direction]) == names
            assert all(0.0 <= v <= 1.0 for v in row[direction].values())
    table = format_table(results, dataset="synthetic")
    assert "map@all" in table and "+-" in table and "cca-itq" in table
    other = format_other_metrics(results, dataset="synthetic").splitlines()
    assert other[1].split() == [
        "method",
        "dir",
        "bits",
        *(n.replace("instance-", "inst-") for n in names),
    ]
    assert len(other) == 2 + 5 * 2 * 2  # title, header, one row per method, direction and L
    assert all(len(line) < 140 for line in other)
    png = tmp_path / "pr.png"
    plot_pr_curves(results, dataset="synthetic", bits=16, path=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_scoring_in_query_blocks_matches_scoring_at_once() -> None:
    rng = np.random.default_rng(2)
    n_query = QUERY_BLOCK * 2 + 5
    query = np.where(rng.random((n_query, 16)) > 0.5, 1, -1).astype(np.int8)
    db = np.where(rng.random((400, 16)) > 0.5, 1, -1).astype(np.int8)
    query_labels = (rng.random((n_query, 5)) > 0.7).astype(np.uint8)
    db_labels = (rng.random((400, 5)) > 0.7).astype(np.uint8)
    partners = np.where(rng.random((n_query, 16)) > 0.5, 1, -1).astype(np.int8)
    score = score_direction(
        query, db, query_labels, db_labels, partners=partners, real_valued=False, seed=4
    )
    dists, rel = hamming_distances(query, db), relevance(query_labels, db_labels)
    assert score.map_all == pytest.approx(float(np.mean(average_precisions(dists, rel, seed=4))))
    precision, recall = mean_curve(*radius_curves(dists, rel, n_bits=16))
    assert np.allclose(score.curve.precision, precision, equal_nan=True)
    assert np.allclose(score.curve.recall, recall)
    whole = ranked_scores(dists, rel, ks=np.array([1, 10, 100]), seed=4)
    assert score.map_r == pytest.approx(float(whole.ap_r.mean()))
    assert list(score.precision_at.values()) == pytest.approx(whole.precision.mean(axis=0))
    assert list(score.recall_at.values()) == pytest.approx(whole.recall.mean(axis=0))
    own = partner_ranks(hamming_distances(query, partners), np.arange(n_query), seed=4)
    assert score.instance_recall_at == {k: pytest.approx(np.mean(own <= k)) for k in (1, 5, 10)}


@pytest.mark.parametrize("real_valued", [False, True])
def test_instance_recall_finds_each_query_s_own_pair(real_valued: bool) -> None:
    rng = np.random.default_rng(5)
    n_query = QUERY_BLOCK + 40  # more than one block: each block's own pairs are offset rows
    latent = rng.normal(size=(n_query, 32))
    image = latent if real_valued else np.where(latent > 0, 1, -1).astype(np.int8)
    text = image.copy()  # each text's code is its own image's code: its pair ranks first
    db = image[:50]
    labels = np.eye(2, dtype=np.uint8)[rng.integers(0, 2, size=n_query)]
    run = score_run(
        method="same", bits=32, seed=0, image_query=image, text_query=text, image_db=db,
        text_db=db, query_labels=labels, db_labels=labels[:50], real_valued=real_valued,
    )  # fmt: skip
    assert run.i2t.instance_recall_at == {1: 1.0, 5: 1.0, 10: 1.0}
    assert run.t2i.instance_recall_at == {1: 1.0, 5: 1.0, 10: 1.0}
    # Pairs broken by a shift: each query's own pair is now a random item, found in the top 10
    # of 168 about 6% of the time, not always.
    shifted = score_run(
        method="shifted", bits=32, seed=0, image_query=image, text_query=np.roll(text, 1, axis=0),
        image_db=db, text_db=db, query_labels=labels, db_labels=labels[:50],
        real_valued=real_valued,
    )  # fmt: skip
    assert shifted.i2t.instance_recall_at[10] < 0.2 and shifted.t2i.instance_recall_at[1] < 0.05


def test_method_and_bits_lists_are_validated() -> None:
    assert [m.name for m in parse_methods("lsh, cca,lsh")] == ["lsh", "cca"]
    with pytest.raises(InputError, match="expected methods from"):
        parse_methods("cvh,nope")
    assert parse_bits("64,16,32") == [16, 32, 64]
    with pytest.raises(InputError, match="integers"):
        parse_bits("16,x")
    with pytest.raises(InputError, match="1..1024"):
        parse_bits("0")


def test_cli_rejects_an_unknown_method_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", "--dataset", "wikipedia", "--root", ".", "--methods", "nope"])
    assert code == 2
    assert "expected methods from" in capsys.readouterr().err


def test_cli_rejects_fewer_than_one_train_process_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["evaluate", "--dataset", "wikipedia", "--root", ".", "--train-processes", "0"]
    assert main(args) == 2
    assert "expected --train-processes >= 1, got 0" in capsys.readouterr().err


def test_cli_on_the_wikipedia_development_split(
    wikipedia_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "wiki.json"
    code = main(
        [
            "evaluate",
            "--dataset",
            "wikipedia",
            "--root",
            str(wikipedia_root),
            "--methods",
            "cca-itq,cca",
            "--bits",
            "16",
            "--seeds",
            "1",
            "--json",
            str(out),
            "--plots",
            str(tmp_path),
        ]
    )
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["dataset"] == "wikipedia"
    assert doc["protocol"]["queries"] == 435 and doc["protocol"]["database"] == 1738
    by_method = {r["method"]: r for r in doc["results"]}
    # Ten classes: random MAP@all is about 0.1; both methods are clearly above it.
    assert by_method["cca-itq"]["i2t_map"] > 0.17 and by_method["cca-itq"]["t2i_map"] > 0.15
    assert by_method["cca"]["i2t_map"] > 0.2 and by_method["cca"]["t2i_map"] > 0.2
    for direction in ("i2t", "t2i"):  # the other metrics: above chance, inside their bounds
        cca = by_method["cca"][direction]
        assert 0.1 < cca["map@r"] < 1.0
        assert cca["r@1"] <= cca["r@10"] <= cca["r@100"] < 1.0
        # 435 queries: chance Recall@10 of the own pair is 10 / 435, about 0.023.
        assert 0.05 < cca["instance-r@10"] <= 1.0
    assert (tmp_path / "wikipedia-16bits-pr.png").is_file()
    out = capsys.readouterr().out
    assert "cca-itq" in out and "inst-r@10" in out


def test_validation_split_holds_out_part_of_the_training_rows() -> None:
    train_idx = np.arange(10, 110, dtype=np.int64)
    fit_idx, val_idx = validation_split(train_idx, fraction=0.2, seed=3)
    assert val_idx.size == 20 and fit_idx.size == 80
    assert np.array_equal(np.sort(np.concatenate([fit_idx, val_idx])), train_idx)
    again = validation_split(train_idx, fraction=0.2, seed=3)
    assert np.array_equal(again[1], val_idx)
    with pytest.raises(InputError, match="validation fraction"):
        validation_split(train_idx[:2], fraction=0.1, seed=0)


def test_baselines_choose_their_regulariser_on_validation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="models.methods.compare"):
        evaluate_methods(synthetic_dataset(), methods=parse_methods("cmfh"), bits=[8], seeds=[0])
    assert "validation MAP@all by regularisation" in caplog.text
    assert "chose" in caplog.text


def test_aucmh_and_its_ablations_run_through_the_method_table() -> None:
    names = "aucmh,aucmh-no-lr,aucmh-no-lg,aucmh-no-hash"
    assert [m.name for m in parse_methods(names)] == names.split(",")
    # 150 pairs (60 queries) keep AUCMH's default 100 epochs to about a second on one core.
    data = synthetic_dataset(150)
    results = evaluate_methods(data, methods=parse_methods("aucmh"), bits=[16], seeds=[0])
    assert [(r.method, r.bits, r.seed) for r in results] == [("aucmh", 16, 0)]
    assert results[0].i2t.map_all > 0.6 and results[0].t2i.map_all > 0.6  # random: about 1/3


def test_every_held_out_split_is_one_seeded_split() -> None:
    train_idx = np.arange(10, 110, dtype=np.int64)
    kept, held = seeded_split(train_idx, n_held=20, seed=5)
    assert held.size == 20 and np.array_equal(np.sort(np.concatenate([kept, held])), train_idx)
    assert np.all(np.diff(kept) > 0) and np.all(np.diff(held) > 0)
    assert not np.array_equal(held, seeded_split(train_idx, n_held=20, seed=6)[1])
    # The baselines' split (a fraction) and AUCMH's epoch split (a count) are this one split.
    for fit, val in (
        validation_split(train_idx, fraction=0.2, seed=5),
        split_train(train_idx, n_val=20, seed=5),
    ):
        assert np.array_equal(fit, kept) and np.array_equal(val, held)


class _Projection:
    """A fixed random projection: signs as codes, or the projection itself (real-valued)."""

    def __init__(self, image_dim: int, text_dim: int, *, real_valued: bool) -> None:
        rng = np.random.default_rng(1)
        self.wi, self.wt = rng.normal(size=(image_dim, 16)), rng.normal(size=(text_dim, 16))
        self.real_valued = real_valued

    def _out(self, x: np.ndarray) -> np.ndarray:
        return x if self.real_valued else np.where(x > 0, 1, -1).astype(np.int8)

    def encode_image(self, features: np.ndarray) -> np.ndarray:
        return self._out(features @ self.wi)

    def encode_text(self, features: np.ndarray) -> np.ndarray:
        return self._out(features @ self.wt)


@pytest.mark.parametrize("real_valued", [False, True])
def test_validation_map_is_the_map_at_all_that_score_run_reports(real_valued: bool) -> None:
    data = synthetic_dataset(n=QUERY_BLOCK * 2 + 100)  # queries in more than one block
    assert data.image_features is not None and data.text_features is not None
    image, text = data.image_features, data.text_features
    model = _Projection(image.shape[1], text.shape[1], real_valued=real_valued)
    q, db = np.arange(QUERY_BLOCK + 30), np.arange(QUERY_BLOCK + 30, len(data))
    i2t, t2i = validation_map(
        model, image=image, text=text, labels=data.labels, query_idx=q, db_idx=db,
        real_valued=real_valued, seed=3,
    )  # fmt: skip
    run = score_run(
        method="projection", bits=16, seed=3, image_query=model.encode_image(image[q]),
        text_query=model.encode_text(text[q]), image_db=model.encode_image(image[db]),
        text_db=model.encode_text(text[db]), query_labels=data.labels[q],
        db_labels=data.labels[db], real_valued=real_valued,
    )  # fmt: skip
    assert (i2t, t2i) == (run.i2t.map_all, run.t2i.map_all)
    if not real_valued:  # and what AUCMH's trainer computed before it used validation_map
        dists = hamming_distances(model.encode_image(image[q]), model.encode_text(text[db]))
        rel = relevance(data.labels[q], data.labels[db])
        assert i2t == float(np.mean(average_precisions(dists, rel, seed=3)))
