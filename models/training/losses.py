"""AUCMH's batch anchor graph (Eq. 2-4) and its two losses (Eq. 6 and 7): pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosines between the rows of a (n, d) and b (p, d) -> (n, p); zero rows give 0.

    On codes in {-1, +1}^L this is <h, h'> / L, the paper's code similarity.
    """
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def nearest_anchors(x: Tensor, anchors: Tensor, *, k: int) -> tuple[Tensor, Tensor]:
    """The non-zero part of S (Eq. 2) for a batch x (n, d) and anchors (m, d), per point.

    Returns cosines (n, k') to each point's k' = min(k, m) nearest anchors (by cosine), negatives
    clipped to 0 so that W and G stay non-negative (a no-op on the paper's non-negative fc7 and
    bag-of-words features), and those anchors' indices (n, k'). A point's row depends on nothing
    but that point, so training can compute it once per point instead of once per batch.
    """
    top, idx = cosine_matrix(x, anchors).topk(min(k, anchors.shape[0]), dim=1)
    return top.clamp_min(0.0), idx


def graph_from_nearest(values: Tensor, idx: Tensor, *, m: int) -> Tensor:
    """Row-normalised batch graph G (n, n) (Eq. 3) from nearest_anchors' output for n points.

    W (n, n) holds cosines between the columns of S (m, n); its diagonal is 1 even for a point
    with an all-zero column, so every row of G = D^-1 W sums to 1.
    """
    s_t = torch.zeros(values.shape[0], m, dtype=values.dtype, device=values.device)
    s_t.scatter_(1, idx, values)  # (n, m): S transposed
    w = cosine_matrix(s_t, s_t)  # (n, n), symmetric
    w.fill_diagonal_(1.0)
    return w / w.sum(dim=1, keepdim=True)


GRAPH_FUSIONS = ("mean", "product")  # how fuse_graphs joins the two modalities' graphs


def fuse_graphs(
    g_image: Tensor, g_text: Tensor, *, fusion: str = "mean", text_weight: float = 0.5
) -> Tensor:
    """P (n, n) from the two row-normalised graphs; every row sums to 1.

    "mean": (G_image + G_text) / 2, the paper's Eq. 4: a pair is near when either modality says
    so; with text_weight w other than 1/2 (beyond the paper) (1 - w) G_image + w G_text.
    "product" (beyond the paper): G_image * G_text elementwise, rows renormalised: near only
    when both say so (the diagonal of each is positive, so no row is empty); w must be 1/2.
    """
    if not 0.0 <= text_weight <= 1.0 or (fusion != "mean" and text_weight != 0.5):
        raise ValueError(f"expected text_weight in [0, 1], 0.5 unless mean, got {text_weight!r}")
    if fusion == "mean":
        if text_weight == 0.5:
            return 0.5 * (g_image + g_text)  # the paper's Eq. 4 in its own arithmetic
        return (1.0 - text_weight) * g_image + text_weight * g_text
    if fusion == "product":
        both = g_image * g_text
        return both / both.sum(dim=1, keepdim=True)
    raise ValueError(f"expected a graph fusion in {GRAPH_FUSIONS}, got {fusion!r}")


def anchor_graph(x: Tensor, anchors: Tensor, *, k: int) -> Tensor:
    """Row-normalised batch graph G (n, n) of one modality: batch x (n, d), anchors (m, d)."""
    values, idx = nearest_anchors(x, anchors, k=k)
    return graph_from_nearest(values, idx, m=anchors.shape[0])


def pair_affinity(
    image: Tensor,
    text: Tensor,
    image_anchors: Tensor,
    text_anchors: Tensor,
    *,
    k: int,
    fusion: str = "mean",
) -> Tensor:
    """P (n, n) (Eq. 4 with the default fusion), rows sum to 1; no gradient flows through it."""
    with torch.no_grad():
        return fuse_graphs(
            anchor_graph(image, image_anchors, k=k),
            anchor_graph(text, text_anchors, k=k),
            fusion=fusion,
        )


def anchor_graph_loss(
    h_image: Tensor, h_text: Tensor, p: Tensor, *, temperature: float = 1.0
) -> Tensor:
    """L_g (Eq. 6): cross-entropy of P (n, n) against Q_it and Q_ti, summed, averaged over rows.

    Q_it[j] = softmax_l(cos(h_image_j, h_text_l) / temperature) (Eq. 5), Q_ti likewise with
    text rows; temperature 1 is the paper's form. Equals KL(P||Q_it) + KL(P||Q_ti) + 2 H(P).
    """
    logits = cosine_matrix(h_image, h_text) / temperature  # (n, n)
    log_q_it = F.log_softmax(logits, dim=1)
    log_q_ti = F.log_softmax(logits.T, dim=1)
    n = p.shape[0]
    return -((p * log_q_it).sum() + (p * log_q_ti).sum()) / n


def _mean_violations(g: Tensor) -> Tensor:
    """Mean of the positive entries of g off the diagonal; 0 (with a graph) when there are none."""
    off = ~torch.eye(g.shape[0], dtype=torch.bool, device=g.device)
    violating = (g > 0) & off
    count = violating.sum()
    # Summing a masked tensor keeps the result attached to the graph even when nothing violates.
    return (g * violating).sum() / count.clamp_min(1)


def ranking_loss(h_image: Tensor, h_text: Tensor, *, margin: float) -> Tensor:
    """L_r (Eq. 7): triplet hinge on code cosines, image-to-text plus text-to-image.

    For j != l, g = margin + cos(h_image_j, h_text_l) - cos(h_image_j, h_text_j) (and the
    same with the modalities swapped); each direction averages g over its violating triplets.
    """
    c = cosine_matrix(h_image, h_text)  # (n, n): row j is image j against every text
    pos = c.diagonal()
    g_it = margin + c - pos[:, None]
    g_ti = margin + c.T - pos[:, None]
    return _mean_violations(g_it) + _mean_violations(g_ti)


def contrastive_loss(h_image: Tensor, h_text: Tensor, *, temperature: float) -> Tensor:
    """A symmetric in-batch InfoNCE on code cosines (beyond the paper; UCCH's spirit).

    Each image's own text is its one positive among the batch's texts and the other way round:
    cross-entropy of softmax_l(cos(h_image_j, h_text_l) / temperature) against the identity,
    averaged over rows and the two directions. Unlike L_g (whose P spreads each row over the
    graph's neighbours, at temperature 1 on cosines in [-1, 1]) it asks for a sharp pairing.
    """
    logits = cosine_matrix(h_image, h_text) / temperature
    own = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, own) + F.cross_entropy(logits.T, own))
