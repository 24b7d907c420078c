"""Short queries (issue 32): the words evaluation draws, the figures it adds, asymmetric scoring,
and the short text views training can learn from (models/features/short_text.py).

Oracles: a short query's features are the vectorizer's features of the typed words; asymmetric
MAP is recomputed here by sorting inner products; training is compared with itself option off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from common.errors import InputError
from evaluation.report import format_words_table, results_document
from models.data.dataset import PairDataset
from models.features.pipeline import fit_text_features, reweight, text_vectorizer
from models.features.short_text import draw_words, parse_query_words, short_rows
from models.methods.compare import (
    DEFAULT_METHOD,
    METHODS,
    evaluate_methods,
    on_validation,
    parse_methods,
    short_queries,
    train_row,
)
from models.methods.compare import aucmh as aucmh_row
from models.network.checkpoint import load_checkpoint
from models.training.train import TrainConfig, train

CLASSES = 4
TOPIC = [[f"c{c}w{i}" for i in range(12)] for c in range(CLASSES)]  # each class's own words
SHARED = [f"s{i}" for i in range(30)]  # words of every class


def worded_pairs(n: int = 320, seed: int = 0) -> PairDataset:
    """Pairs of a class-centred image vector and a caption of 3-12 words, half of its class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(CLASSES), n // CLASSES)
    centres = rng.standard_normal((CLASSES, 16)) * 2
    image = centres[labels] + rng.standard_normal((n, 16))
    texts = []
    for c in labels:
        size = int(rng.integers(3, 13))
        own = rng.choice(TOPIC[c], size=size // 2 + 1)
        other = rng.choice(SHARED, size=size - size // 2 - 1)
        texts.append(" ".join(rng.permutation([*own, *other])))
    order = rng.permutation(n)
    data = PairDataset(
        name="worded",
        ids=[str(i) for i in range(n)],
        labels=np.eye(CLASSES, dtype=np.uint8)[labels],
        train_idx=np.sort(order[80:]),
        query_idx=np.sort(order[:80]),
        database_idx=np.sort(order[80:]),
        texts=texts,
    )
    text, vectorizer = fit_text_features(data, vocab_size=1000)
    return data.with_features(
        image=image.astype(np.float32),
        text=text,
        image_backbone="synthetic",
        vocabulary=vectorizer.vocabulary,
    )


def small(**fields: object) -> TrainConfig:
    return TrainConfig(n_bits=16, epochs=3, n_anchors=64, n_val=40, batch_size=64, **fields)  # type: ignore[arg-type]


def test_query_words_parse_and_refuse() -> None:
    assert parse_query_words("3,1,2,1") == [1, 2, 3]
    assert parse_query_words("none") == [] and parse_query_words("") == []
    for bad in ("0", "a", "1,21"):
        with pytest.raises(InputError, match="word counts"):
            parse_query_words(bad)


@pytest.mark.parametrize("weighting", ["binary", "tfidf"])
def test_a_short_query_is_the_typed_words_of_its_caption(weighting: str) -> None:
    data = reweight(worded_pairs(), weighting)
    vectorizer = text_vectorizer(data, weighting)
    assert data.texts is not None
    for n_words in (1, 2, 3):
        features, rows = short_queries(data, n_words)
        again, _ = short_queries(data, n_words)
        assert np.array_equal(features, again)  # a fixed seed: every run meets the same queries
        assert rows.tolist() == data.query_idx.tolist()  # every caption here knows a word
        for row, i in zip(features, rows, strict=True):
            words = [vectorizer.vocabulary[j] for j in np.flatnonzero(row)]
            caption = set(data.texts[i].split())
            assert len(words) == min(n_words, len(caption)) and set(words) <= caption
            typed, _ = vectorizer.transform([" ".join(words)])  # what the service encodes
            assert np.array_equal(row, typed[0])


def test_words_are_drawn_without_replacement() -> None:
    rng = np.random.default_rng(0)
    drawn = draw_words([np.arange(10), np.array([4, 7]), np.array([], dtype=np.intp)], 3, rng)
    assert len(set(drawn[0].tolist())) == 3 and set(drawn[0].tolist()) <= set(range(10))
    assert drawn[1].tolist() == [4, 7] and drawn[2].size == 0


def test_short_rows_keep_that_many_words_at_their_values() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((50, 40)) < 0.2) * rng.random((50, 40)).astype(np.float32)
    n = rng.integers(1, 4, size=50)
    cut = short_rows(x, n, np.random.default_rng(1), normalised=False)
    for row, full, want in zip(cut, x, n, strict=True):
        kept = np.flatnonzero(row)
        assert kept.size == min(want, np.count_nonzero(full))
        assert np.array_equal(row[kept], full[kept])
    unit = short_rows(x, 2, np.random.default_rng(1), normalised=True)
    norms = np.linalg.norm(unit, axis=1)
    assert np.allclose(norms[x.any(axis=1)], 1.0, atol=1e-6)
    with pytest.raises(InputError, match="at least 1 word"):
        short_rows(x, 0, rng, normalised=False)


def _map_by_inner_product(
    query: np.ndarray, db: np.ndarray, ql: np.ndarray, dl: np.ndarray
) -> float:
    """MAP@all ranking db (codes) by descending inner product with real queries (no ties here)."""
    aps = []
    for q, labels in zip(query, ql, strict=True):
        order = np.argsort(-(db.astype(np.float64) @ q.astype(np.float64)), kind="stable")
        relevant = (dl[order] @ labels) > 0
        hits = np.cumsum(relevant)
        ranks = np.flatnonzero(relevant) + 1
        aps.append(np.mean(hits[relevant] / ranks) if relevant.any() else 0.0)
    return float(np.mean(aps))


def test_evaluate_adds_short_queries_and_asymmetric_scoring() -> None:
    data = worded_pairs()
    aucmh = dataclasses.replace(METHODS["aucmh"], fit=lambda d, b, s, /, cache=None, processes=1: (
        train(cfg=dataclasses.replace(small(), n_bits=b, seed=s), data=d)[0]
    ))  # fmt: skip
    methods = [aucmh, METHODS["lsh"]]
    results = evaluate_methods(
        data, methods=methods, bits=[16], seeds=[0], scorings=["hamming", "asymmetric"],
        query_words=[1, 3],
    )  # fmt: skip
    # LSH has no real output before its signs: Hamming only.
    assert [(r.method, r.scoring) for r in results] == [
        ("aucmh", "hamming"), ("aucmh", "asymmetric"), ("lsh", "hamming"),
    ]  # fmt: skip
    for r in results:
        assert sorted(r.t2i_words) == [1, 3] and sorted(r.t2t_words) == [1, 3]
        for score in (*r.t2i_words.values(), *r.t2t_words.values()):
            assert 0.0 < score.map_all <= 1.0 and 0.0 <= score.precision_at <= 1.0
            assert score.queries == data.query_idx.size
    # The asymmetric row ranks the stored image codes by the text query's real output.
    model = aucmh.fit(data, 16, 0)
    q, db = data.query_idx, data.database_idx
    assert data.text_features is not None and data.image_features is not None
    expected = _map_by_inner_product(
        model.embed_text(data.text_features[q]), model.encode_image(data.image_features[db]),
        data.labels[q], data.labels[db],
    )  # fmt: skip
    assert results[1].t2i.map_all == pytest.approx(expected, abs=1e-12)
    short, _ = short_queries(data, 1)
    one_word = _map_by_inner_product(
        model.embed_text(short), model.encode_image(data.image_features[db]),
        data.labels[q], data.labels[db],
    )  # fmt: skip
    assert results[1].t2i_words[1].map_all == pytest.approx(one_word, abs=1e-12)
    doc = results_document(results, dataset="worded", n_query=80, n_database=240)
    row = doc["results"][1]
    assert row["scoring"] == "asymmetric"
    assert set(row["t2i_words"]) == {"1", "3"}
    assert set(row["t2i_words"]["1"]) == {"map_all", "map@r", "p@10", "queries"}
    table = format_words_table(results, dataset="worded")
    assert "aucmh (asymmetric)" in table and "t2i 1w" in table and "t2t 3w" in table


def test_short_queries_need_raw_texts(caplog: pytest.LogCaptureFixture) -> None:
    data = dataclasses.replace(worded_pairs(), texts=None, vocabulary=None)
    with caplog.at_level(logging.WARNING):
        results = evaluate_methods(
            data, methods=[METHODS["lsh"]], bits=[16], seeds=[0], query_words=[1]
        )
    assert results[0].t2i_words == {} and "no raw texts" in caplog.text
    assert format_words_table(results, dataset="x") == ""


def test_validation_queries_come_from_the_training_part_only() -> None:
    data = worded_pairs()
    held = on_validation(data)
    assert set(held.query_idx) <= set(data.train_idx)
    assert not set(held.query_idx) & set(held.train_idx)
    assert not set(held.query_idx) & set(data.query_idx)  # the real queries are never read
    assert np.array_equal(held.database_idx, held.train_idx)
    assert held.query_idx.size == round(0.2 * data.train_idx.size)


def test_short_views_change_training_and_need_words() -> None:
    data = worded_pairs()
    plain, _ = train(cfg=small(), data=data)
    viewed, history = train(cfg=small(short_view_weight=1.0, val_short_words=3), data=data)
    assert all("val_t2i_short" in row for row in history)
    differs = [
        not torch.equal(a, b)
        for a, b in zip(plain.state_dict().values(), viewed.state_dict().values(), strict=True)
    ]
    assert any(differs)
    # Without a vocabulary (LDA-like features) there are no words to cut: the same training.
    topics = dataclasses.replace(data, vocabulary=None)
    a, _ = train(cfg=small(), data=topics)
    b, history = train(cfg=small(short_view_weight=1.0, val_short_words=3), data=topics)
    assert "val_t2i_short" not in history[0]
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def _pairs_file(tmp_path: Path) -> Path:
    """A pairs.jsonl of worded_pairs' captions with tiny images."""
    from PIL import Image

    data = worded_pairs(n=120)
    assert data.texts is not None
    lines = []
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i, (text, label) in enumerate(zip(data.texts, data.labels.argmax(1), strict=True)):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), colours[int(label)]).save(path)
        lines.append(json.dumps({"id": str(i), "image": path.name, "text": text}))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    return pairs


def test_cmh_train_trains_the_named_row_and_flags_override_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = _pairs_file(tmp_path)
    out = tmp_path / "model.pt"
    common = ["train", "--dataset", "pairs", "--root", str(pairs.parent), "--cache-dir",
              str(tmp_path / "cache"), "--out", str(out), "--epochs", "2", "--k", "5",
              "--anchors", "32", "--n-val", "20", "--bits", "16", "--device", "cpu"]  # fmt: skip
    method = "aucmh-tfidf-search-graph-text-0.8-short-views"
    assert main([*common, "--method", method, "--short-view-words", "2"]) == 0
    saved = load_checkpoint(out)
    row = METHODS[method]
    assert saved.text_weighting == row.text_weighting == "tfidf"
    assert saved.text_tokens == row.text_tokens == "search"
    assert saved.train_config["graph_text_weight"] == 0.8
    assert saved.train_config["short_view_weight"] == 1.0
    assert saved.train_config["short_view_words"] == 2  # the flag given wins
    assert saved.train_config["epochs"] == 2
    # No --method: the default row, which `cmh evaluate --methods default` evaluates; it chooses
    # one of its candidates on validation, and the checkpoint reads text as that one does.
    capsys.readouterr()
    assert main(common) == 0
    summary = dict(f.split("=", 1) for f in capsys.readouterr().out.split())
    default = METHODS[DEFAULT_METHOD]
    assert summary["method"] == DEFAULT_METHOD and summary["trained"] in default.candidates
    chosen = METHODS[summary["trained"]]
    saved = load_checkpoint(out)
    assert (saved.text_weighting, saved.text_tokens) == (chosen.text_weighting, chosen.text_tokens)
    assert parse_methods("default") == [default]
    with pytest.raises(SystemExit) as exit_info:  # a baseline is not something cmh trains
        main([*common, "--method", "cvh"])
    assert exit_info.value.code == 2


def test_a_row_weighting_text_trains_on_shipped_text_features_as_given() -> None:
    # Wikipedia ships LDA topics: a tf-idf row cannot reweight them, so it fits on them as given
    # (the default row must train on every dataset `cmh train` reads).
    data = dataclasses.replace(worded_pairs(), texts=None)
    seen: list[np.ndarray] = []

    def fit(d: PairDataset, n_bits: int, seed: int, /, cache: object = None, processes: int = 1):  # type: ignore[no-untyped-def]
        assert d.text_features is not None
        seen.append(d.text_features)
        return METHODS["lsh"].fit(d, n_bits, seed)

    row = dataclasses.replace(METHODS["aucmh-tfidf-search-graph-text-0.8-short-views"], fit=fit)
    evaluate_methods(data, methods=[row], bits=[16], seeds=[0])
    assert data.text_features is not None and np.array_equal(seen[0], data.text_features)


def test_a_choosing_row_keeps_the_candidate_of_best_validation_score(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = worded_pairs()
    weak = aucmh_row("weak", lr=1e-9)  # barely moves from its random start
    strong = aucmh_row("strong")
    monkeypatch.setitem(METHODS, "weak", weak)
    monkeypatch.setitem(METHODS, "strong", strong)
    both = dataclasses.replace(METHODS["aucmh-auto"], candidates=("weak", "strong"))
    overrides = {"n_bits": 16, "epochs": 3, "n_anchors": 64, "n_val": 40, "batch_size": 64}
    trained = train_row(data, both, overrides=overrides, ks=(10,))
    alone = {
        name: train_row(
            data, METHODS[name], overrides={**overrides, "val_short_words": 3}, ks=(10,)
        ).score
        for name in ("weak", "strong")
    }
    assert trained.method == "strong" and alone["strong"] > alone["weak"]
    assert trained.score == pytest.approx(alone["strong"])  # judged with short queries too
    assert trained.config.val_short_words == 3 and "val_t2i_short" in trained.history[0]
    # A row that is not a choice trains as it says, with its own criterion.
    single = train_row(data, strong, overrides=overrides, ks=(10,))
    assert single.method == "strong" and single.config.val_short_words == 0
