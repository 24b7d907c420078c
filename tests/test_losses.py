"""The batch anchor graph (Eq. 2-4) and the losses (Eq. 6-7) on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from models.training.losses import (
    anchor_graph,
    anchor_graph_loss,
    cosine_matrix,
    fuse_graphs,
    graph_from_nearest,
    nearest_anchors,
    pair_affinity,
    ranking_loss,
)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(20, 6, generator=gen)
    text = torch.rand(20, 4, generator=gen)
    return image, text, torch.rand(30, 6, generator=gen), torch.rand(30, 4, generator=gen)


def test_graph_rows_sum_to_one_and_w_is_symmetric(batch) -> None:
    image, text, image_anchors, text_anchors = batch
    g = anchor_graph(image, image_anchors, k=3)
    assert torch.allclose(g.sum(dim=1), torch.ones(20), atol=1e-6)
    assert (g >= 0).all()
    # G = D^-1 W with W symmetric: G * row sums is symmetric again.
    sims = cosine_matrix(image, image_anchors)
    top, idx = sims.topk(3, dim=1)
    s_t = torch.zeros_like(sims).scatter_(1, idx, top)
    w = cosine_matrix(s_t, s_t)
    assert torch.allclose(w, w.T, atol=1e-6)
    assert torch.allclose(g * w.sum(dim=1, keepdim=True), w, atol=1e-5)
    p = pair_affinity(image, text, image_anchors, text_anchors, k=3)
    assert torch.allclose(p.sum(dim=1), torch.ones(20), atol=1e-6)
    assert not p.requires_grad


def test_graph_fusions_mean_is_eq_4_and_product_keeps_what_both_graphs_link(batch) -> None:
    image, text, image_anchors, text_anchors = batch
    gi, gt = anchor_graph(image, image_anchors, k=3), anchor_graph(text, text_anchors, k=3)
    assert torch.equal(fuse_graphs(gi, gt), 0.5 * (gi + gt))
    assert torch.equal(
        pair_affinity(image, text, image_anchors, text_anchors, k=3), 0.5 * (gi + gt)
    )
    weighted = fuse_graphs(gi, gt, text_weight=0.7)  # beyond the paper: the text graph weighs more
    assert torch.allclose(weighted, 0.3 * gi + 0.7 * gt)
    assert torch.allclose(weighted.sum(dim=1), torch.ones(20), atol=1e-6)
    assert torch.equal(fuse_graphs(gi, gt, text_weight=1.0), gt)
    for fusion, bad in (("mean", 1.5), ("mean", -0.1), ("product", 0.7)):
        with pytest.raises(ValueError, match="text_weight"):
            fuse_graphs(gi, gt, fusion=fusion, text_weight=bad)
    product = fuse_graphs(gi, gt, fusion="product")
    assert torch.allclose(product.sum(dim=1), torch.ones(20), atol=1e-6)
    assert torch.equal(product > 0, (gi > 0) & (gt > 0))  # linked only where both link
    expected = (gi * gt)[0] / (gi * gt)[0].sum()
    assert torch.allclose(product[0], expected)
    # Two points linked in one modality only: the mean links them, the product does not.
    one = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert fuse_graphs(one, torch.eye(2), fusion="product").tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="expected a graph fusion in"):
        fuse_graphs(gi, gt, fusion="max")


def test_graph_links_points_that_share_anchors() -> None:
    anchors = torch.eye(4)
    x = torch.tensor([[1.0, 0.1, 0, 0], [0.9, 0, 0.1, 0], [0, 0, 0, 1.0]])
    g = anchor_graph(x, anchors, k=1)
    # Points 0 and 1 share their nearest anchor; point 2 shares none, so it links only to itself.
    assert g[0, 1] == pytest.approx(0.5) and g[0, 2] == 0
    assert g[2].tolist() == [0.0, 0.0, 1.0]


def test_graph_with_all_negative_cosines_stays_a_distribution() -> None:
    g = anchor_graph(-torch.ones(3, 2), torch.ones(5, 2), k=2)
    assert torch.allclose(g, torch.eye(3))


def test_graph_loss_is_lower_for_codes_matching_p() -> None:
    h = torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]])
    p = torch.eye(2)
    same = anchor_graph_loss(h, h, p)
    opposite = anchor_graph_loss(h, -h, p)
    # Identical codes: Q_jj = e / (e + e^-1) per direction; opposite codes swap the roles.
    expected_same = -2 * math.log(math.e / (math.e + math.exp(-1)))
    assert same.item() == pytest.approx(expected_same, rel=1e-5)
    assert opposite.item() > same.item() and math.isfinite(opposite.item())
    sharper = anchor_graph_loss(h, h, p, temperature=0.1)
    assert sharper.item() < same.item()


def test_ranking_loss_zero_without_violations_and_keeps_a_graph() -> None:
    h = torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]], requires_grad=True)
    loss = ranking_loss(h, h.detach().clone(), margin=0.5)
    assert loss.item() == 0.0
    loss.backward()  # safe when no triplet violates
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_ranking_loss_averages_violating_triplets() -> None:
    hi = torch.tensor([[1.0, 1, 1, 1], [-1, -1, -1, -1]])
    # Opposite codes: cos(pos) = -1, cos(neg) = +1, so g = margin + 2 for both off-diagonal pairs.
    assert ranking_loss(hi, -hi, margin=0.2).item() == pytest.approx(2 * 2.2)
    # Text 0 is half-way between the images: cos(i0, t0) = cos(i1, t0) = 0, cos(i1, t1) = 1.
    ht = torch.tensor([[-1.0, -1, 1, 1], [-1, -1, -1, -1]])
    # i2t: g = 0.5 - 1 - 0 and 0.5 + 0 - 1, both < 0. t2i: text 0 vs image 1: g = 0.5 + 0 - 0
    # violates; text 1 vs image 0: 0.5 - 1 - 1 does not. The mean over violators is 0.5 (not 0.25).
    assert ranking_loss(hi, ht, margin=0.5).item() == pytest.approx(0.5)


def test_graph_from_nearest_found_once_equals_the_batch_graph(batch) -> None:
    image, _, image_anchors, _ = batch
    values, idx = nearest_anchors(image, image_anchors, k=4)  # every point, once
    rows = torch.tensor([3, 5, 7, 11, 19])
    cached = graph_from_nearest(values[rows], idx[rows], m=30)
    assert torch.allclose(cached, anchor_graph(image[rows], image_anchors, k=4), atol=1e-6)
