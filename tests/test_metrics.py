"""Hand-worked cases for the retrieval metrics (MAP@all, MAP@R, P@K, R@K, PR over radius)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import InputError
from evaluation.metrics import (
    average_precisions,
    hamming_distances,
    mean_curve,
    partner_ranks,
    radius_curves,
    rank,
    ranked_scores,
    relevance,
    tie_break_order,
)


def one_hot(classes: list[int], n_classes: int = 3) -> np.ndarray:
    return np.eye(n_classes, dtype=np.uint8)[classes]


def test_perfect_ranking_gives_map_one() -> None:
    # Relevant items are at Hamming distance 0, irrelevant ones at 4: every relevant item first.
    query = np.array([[1, 1, 1, 1]], dtype=np.int8)
    db = np.array([[1, 1, 1, 1], [-1, -1, -1, -1], [1, 1, 1, 1], [-1, -1, -1, -1]], dtype=np.int8)
    dists = hamming_distances(query, db)
    rel = relevance(one_hot([0]), one_hot([0, 1, 0, 2]))
    assert average_precisions(dists, rel)[0] == pytest.approx(1.0)


def test_reversed_ranking() -> None:
    # Distances 0, 1, 2, 3; the relevant items are the last two: ranks 3 and 4.
    dists = np.array([[0, 1, 2, 3]])
    rel = np.array([[False, False, True, True]])
    assert average_precisions(dists, rel)[0] == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_docstring_tie_example() -> None:
    # metrics.py's worked example: distances [0, 1, 1], relevance [T, F, T].
    dists = np.array([[0, 1, 1]])
    rel = np.array([[True, False, True]])
    values = []
    for seed in range(40):
        perm = tie_break_order(3, seed=seed)
        item2_first = int(np.where(perm == 2)[0][0]) < int(np.where(perm == 1)[0][0])
        ap = average_precisions(dists, rel, seed=seed)[0]
        assert ap == pytest.approx(1.0 if item2_first else 5 / 6)
        values.append(ap)
    # Both tie orders occur over seeds: the order is drawn, not the index order.
    assert set(np.round(values, 6)) == {1.0, round(5 / 6, 6)}


def test_ties_follow_one_fixed_permutation_not_input_order() -> None:
    # All distances tie, relevant items listed last: index order would give the worst ranking.
    n = 200
    dists = np.zeros((5, n), dtype=np.int64)
    rel = np.zeros((5, n), dtype=bool)
    rel[:, n // 2 :] = True
    order = rank(dists, seed=3)
    assert np.array_equal(order, np.tile(tie_break_order(n, seed=3), (5, 1)))
    ap = average_precisions(dists, rel, seed=3)
    assert np.allclose(ap, ap[0])  # the same permutation for every query
    assert abs(ap[0] - 0.5) < 0.1  # a random order scores about the prevalence
    index_order_ap = np.mean(np.arange(1, n // 2 + 1) / np.arange(n // 2 + 1, n + 1))
    assert ap[0] > index_order_ap + 0.05


def test_query_without_relevant_item_scores_zero_and_counts() -> None:
    query = np.array([[1, 1], [1, 1]], dtype=np.int8)
    db = np.array([[1, 1], [-1, -1]], dtype=np.int8)
    # Query 0 (class 0) finds its item first; query 1 (class 2) has nothing relevant.
    dists = hamming_distances(query, db)
    rel = relevance(one_hot([0, 2]), one_hot([0, 1]))
    assert average_precisions(dists, rel).tolist() == [1.0, 0.0]
    scores = ranked_scores(dists, rel, ks=np.array([1, 2]))
    assert scores.ap.mean() == 0.5
    assert scores.recall.mean(axis=0).tolist() == [0.5, 0.5]


def test_precision_and_recall_at_k() -> None:
    dists = np.array([[0, 1, 2, 3, 4]])
    rel = np.array([[True, False, True, False, False]])
    scores = ranked_scores(dists, rel, ks=np.array([1, 2, 3, 5]))
    assert scores.precision[0] == pytest.approx([1.0, 0.5, 2 / 3, 2 / 5])
    assert scores.recall[0].tolist() == [0.5, 0.5, 1.0, 1.0]


def test_map_at_r_counts_only_the_top_r() -> None:
    dists = np.array([[0, 1, 2, 3]])
    rel = np.array([[True, False, False, True]])
    assert average_precisions(dists, rel, top=2)[0] == 1.0  # one hit in the top 2, at rank 1
    assert average_precisions(dists, rel, top=4)[0] == pytest.approx((1 + 2 / 4) / 2)
    assert average_precisions(np.array([[0, 1]]), np.array([[False, True]]), top=1)[0] == 0.0


def test_map_at_r_divides_by_the_relevant_count() -> None:
    # R = 2 for the first two queries. Query 0: within the top 2 one hit, at rank 1: P(1) / R =
    # 1/2. Query 1: one hit, at rank 2: P(2) / R = (1/2) / 2. Query 2: nothing relevant: 0.
    dists = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]])
    rel = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    scores = ranked_scores(dists, rel, ks=np.array([1, 2, 10]))
    assert scores.ap_r.tolist() == [0.5, 0.25, 0.0]
    # The fixed-depth variant divides by the hits found instead: 1.0 for query 0.
    assert average_precisions(dists, rel, top=2)[0] == 1.0
    # A perfect top R scores 1.
    assert ranked_scores(dists[:1], np.array([[1, 1, 0, 0]], dtype=bool), ks=np.array([1])).ap_r[
        0
    ] == pytest.approx(1.0)
    # K beyond the 4-item database: the missing ranks are not relevant.
    assert scores.precision[0].tolist() == [1.0, 0.5, 2 / 10]
    assert scores.recall[1].tolist() == [0.0, 0.5, 1.0]
    assert scores.recall[2].tolist() == [0.0, 0.0, 0.0]


def test_ranked_scores_match_average_precisions_bit_for_bit_and_the_definitions() -> None:
    rng = np.random.default_rng(7)
    dists = rng.integers(0, 6, size=(300, 120))  # many ties; more than one ranking block
    rel = rng.random((300, 120)) > 0.8
    rel[5] = False
    ks = np.array([1, 10, 100])
    scores = ranked_scores(dists, rel, ks=ks, seed=3)
    assert np.array_equal(scores.ap, average_precisions(dists, rel, seed=3))
    # AP@R, P@K and R@K against their definitions, query by query, from the ranking itself.
    order = rank(dists, seed=3)
    for i in (0, 5, 299):
        ranked = rel[i, order[i]]
        r = int(ranked.sum())
        expected = sum(ranked[:k].sum() / k for k in range(1, r + 1) if ranked[k - 1]) / max(r, 1)
        assert scores.ap_r[i] == pytest.approx(expected)
        found = np.array([ranked[:k].sum() for k in ks])
        assert scores.precision[i] == pytest.approx(found / ks)
        assert scores.recall[i] == pytest.approx(found / max(r, 1))


def test_partner_ranks_follow_the_ranking_and_its_tie_order() -> None:
    # No ties: the partner (item 2, distance 1) has one item closer: rank 2.
    assert partner_ranks(np.array([[3, 0, 1, 2]]), np.array([2])).tolist() == [2]
    rng = np.random.default_rng(8)
    dists = rng.integers(0, 4, size=(50, 30))  # heavy ties
    partners = rng.integers(0, 30, size=50)
    order = rank(dists, seed=5)
    expected = [int(np.flatnonzero(order[i] == partners[i])[0]) + 1 for i in range(50)]
    assert partner_ranks(dists, partners, seed=5).tolist() == expected
    with pytest.raises(InputError, match="partners in 0..29"):
        partner_ranks(dists, np.full(50, 30))


def test_multi_label_relevance_means_one_shared_label() -> None:
    q = np.array([[1, 0, 1]], dtype=np.uint8)
    db = np.array([[0, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8)
    assert relevance(q, db).tolist() == [[True, False, True, False]]


def test_precision_recall_by_radius() -> None:
    dists = np.array([[0, 1, 2], [2, 2, 2]])
    rel = np.array([[True, False, True], [False, True, False]])
    precision, recall = mean_curve(*radius_curves(dists, rel, n_bits=2))
    # Radius 0 and 1: only query 0 retrieves anything; radius 2: both retrieve everything.
    assert precision == pytest.approx([1.0, 0.5, (2 / 3 + 1 / 3) / 2])
    assert recall == pytest.approx([0.25, 0.25, 1.0])


def test_precision_by_radius_is_nan_when_nothing_is_retrieved() -> None:
    precision, recall = mean_curve(
        *radius_curves(np.array([[2, 2]]), np.array([[True, False]]), n_bits=2)
    )
    assert np.isnan(precision[0]) and np.isnan(precision[1]) and precision[2] == 0.5
    assert recall.tolist() == [0.0, 0.0, 1.0]


def test_hamming_distances_count_differing_bits() -> None:
    rng = np.random.default_rng(0)
    a = np.where(rng.random((7, 16)) > 0.5, 1, -1).astype(np.int8)
    b = np.where(rng.random((9, 16)) > 0.5, 1, -1).astype(np.int8)
    expected = (a[:, None, :] != b[None, :, :]).sum(axis=2)
    assert np.array_equal(hamming_distances(a, b), expected)


def test_blocks_agree_with_one_query_at_a_time() -> None:
    # More queries than one block (256), so the blocked path is exercised.
    rng = np.random.default_rng(1)
    dists = rng.integers(0, 9, size=(300, 50))
    rel = rng.random((300, 50)) > 0.7
    whole = average_precisions(dists, rel, seed=5)
    single = [average_precisions(dists[i : i + 1], rel[i : i + 1], seed=5)[0] for i in (0, 299)]
    assert whole[[0, 299]] == pytest.approx(single)


def test_bad_inputs_raise_input_error() -> None:
    codes = np.array([[1, 0]], dtype=np.int8)
    with pytest.raises(InputError, match="in \\{-1, \\+1\\}"):
        hamming_distances(codes, codes)
    with pytest.raises(InputError, match="one length"):
        hamming_distances(np.ones((1, 2)), np.ones((1, 3)))
    with pytest.raises(InputError, match="top in 1..2"):
        average_precisions(np.zeros((1, 2)), np.zeros((1, 2), dtype=bool), top=3)
    with pytest.raises(InputError, match="K >= 1"):
        ranked_scores(np.zeros((1, 2)), np.zeros((1, 2), dtype=bool), ks=np.array([0]))


def test_evaluation_imports_neither_torch_nor_models() -> None:
    # Layering: evaluation <- models <- service; the metrics must load without torch.
    code = (
        "import sys, evaluation.metrics, evaluation.protocol, evaluation.report; "
        "bad = [m for m in ('torch', 'models', 'service') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
