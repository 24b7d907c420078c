"""The text network on sparse bags of words in float64 NumPy, with the codes of torch's path.

`HashingModel.encode_text` feeds a dense (n, text_dim) float32 vector through standardise ->
[Linear, ReLU, Dropout (identity in eval)]* -> Linear -> tanh -> L2-normalise -> sign. The
standardised value of an absent word's column j is one float32 number, s0[j]; a present word's is
s1 (binary input: one number per column under "zscore", one per word count under "l2", computed
here with the same float32 operations torch applies elementwise). So the first layer is a
constant, b1 + W1 s0, plus W1[:, j] (s1 - s0) for each of the text's few words, instead of a
2,000-wide product; the later layers are float64 products over the units ReLU leaves on (numba
kernels). tanh and the normalisation keep the sign (away from the underflow range, see FLOOR), so
a code bit is +1 exactly when z > 0.

Weighted input (log counts, tf-idf: a float32 value v per present word, `weighted=True`): under
"zscore", s1 = (v - mean) / std elementwise, again torch's float32 number exactly. Under "l2",
torch first divides v by the row's float32 norm, summed in an order we do not know; s1 is then
computed in float64 from the exact norm and carries a bound on torch's difference, proved for any
summation order: the norm of k positive squares is within (k + 2) u relative (a sum of k positive
terms in float32 or wider, and one rounded sqrt), the division, subtraction and division one u
each, doubled for the higher-order terms and our own float64 rounding (`_l2_values`). The first
layer adds that bound times |W1[:, j]| to its margin. A text whose norm is below 1e-6 (never from
our vectorizers) is left to torch.

Why the codes are torch's, bit for bit. We compute z in float64, the exact value of the network
on torch's float32 inputs and weights to about 1e-13 relative. Torch sums in float32 in an order
we do not know (MKL's, and not the same for one row as for a batch), so its z differs from ours by
rounding. Each layer's difference is bounded as in a forward error analysis, K u (sum of the
magnitudes of the terms) + the underflow slack, and carried through the layers (ReLU is
1-Lipschitz; a unit whose output plus its margin is <= 0 is 0 in torch too and carries nothing):
e(z). A text whose |z| > e(z) + FLOOR in every bit has the sign we compute, in any summation
order; a text with some bit closer to 0 is encoded by torch itself, its batch with it (so a batch
gets the codes `model.encode_text` gives for that batch). The worst-case bound for n terms is
K = n (2,000 here): it is never approached (the errors of a long sum cancel) and would send half
of Web News's captions to torch. K = MARGIN_ULPS = 32 is used: over Web News captions and the
demo's (their checkpoints) and random word mixes, batched and one by one, torch's z was never
further from ours than 1/57 of that margin, and 0.4 % of captions go to torch.

What is reproduced is checked once, at `from_model`: a model this module cannot reproduce exactly
(another network shape or module, another dtype, non-finite weights, reduced-precision matmuls,
standardised values that differ from torch's) is refused with the reason, logged once, and the
caller keeps torch's path. (Past 300 lines with this account: the kernels and the class that
feeds them are one computation.)

Over 400 lines because the sparse path, its numba kernels and the checks that keep its codes
equal to torch's are one exactness argument, easier to follow in one file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import nn

from models.network.aucmh import HashingModel

logger = logging.getLogger(__name__)

MARGIN_ULPS = 32  # K: torch's rounding is taken to be at most K u (sum of |terms|) per layer
U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53  # unit roundoff of float64 (our own rounding, added to the margin)
# Slack per dot product for underflow: each float32 product may lose up to 2**-126 (flushed
# denormals included), so n + 1 terms lose at most (n + 1) 2**-126 beyond the relative bound.
UNDERFLOW = 2.0**-126
# |z| must clear the margin by this much: torch's z is then >= 2**-100, a normal float whose tanh
# and normalised value (divided by at most sqrt(n_bits)) are nonzero with z's sign.
FLOOR = 2.0**-100
# A weighted text under "l2" whose norm is below this goes to torch: a tiny norm is where
# F.normalize's 1e-12 floor and float32 underflow would need their own bound.
MIN_L2_NORM = 1e-6
CHECK_TEXTS = 256  # random word mixes whose codes from_model compares with torch's
CHECK_SEED = 0


def _slack(fan_in: int) -> float:
    """Relative margin per term of a dot product of fan_in terms and a bias: torch's and ours."""
    return MARGIN_ULPS * U32 + (fan_in + 2) * U64


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _first_layer(
    indptr: np.ndarray,
    cols: np.ndarray,
    s0: np.ndarray,
    s1: np.ndarray,
    e1: np.ndarray,
    w_t: np.ndarray,
    base: np.ndarray,
    abs_base: np.ndarray,
    slack: float,
    underflow: float,
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover (compiled)
    """(n, hidden) first-layer outputs and margins of n texts in CSR form (indptr, cols).

    A present word j turns s0[p] into s1[p] (float64; torch's float32 value is within e1[p] of
    it, 0 where it is exactly torch's): text t adds (s1 - s0) W1[:, j] to `base`,
    (|s1| + e1 - |s0|) |W1[:, j]| to its sum of |terms| and e1 |W1[:, j]| to its input error.
    """
    n, hidden = len(indptr) - 1, base.shape[0]
    a = np.empty((n, hidden))
    m = np.empty((n, hidden))
    for t in range(n):
        acc = base.copy()
        mag = abs_base.copy()
        err = np.zeros(hidden)
        for p in range(indptr[t], indptr[t + 1]):
            row = w_t[cols[p]]
            d = s1[p] - s0[p]
            g = abs(s1[p]) + e1[p] - abs(s0[p])
            e = e1[p]
            for i in range(hidden):
                w = abs(np.float64(row[i]))
                acc[i] += d * np.float64(row[i])
                mag[i] += g * w
                err[i] += e * w
        a[t] = acc
        m[t] = slack * mag + err + underflow
    return a, m


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _dense_layer(
    a_in: np.ndarray,
    m_in: np.ndarray,
    w_t: np.ndarray,
    bias: np.ndarray,
    slack: float,
    underflow: float,
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover (compiled)
    """ReLU of the previous layer (a_in, its margins m_in), then this Linear: (a, m), (n, out).

    A unit with a_in + m_in <= 0 is 0 after ReLU in torch as here and is skipped; another one
    differs from torch's by at most m_in, which W carries into the margin with torch's rounding.
    """
    n, fan_in = a_in.shape
    out = w_t.shape[1]
    a = np.empty((n, out))
    m = np.empty((n, out))
    for t in range(n):
        acc = bias.copy()
        terms = np.abs(bias)
        err = np.zeros(out)
        for i in range(fan_in):
            e = m_in[t, i]
            if a_in[t, i] + e <= 0.0:
                continue
            x = max(a_in[t, i], 0.0)
            row = w_t[i]
            for k in range(out):
                w = np.float64(row[k])
                acc[k] += w * x
                terms[k] += abs(w) * (x + e)
                err[k] += abs(w) * e
        a[t] = acc
        m[t] = err + slack * terms + underflow
    return a, m


@dataclass(frozen=True)
class Logits:
    """The network's pre-hash outputs of n texts and how far torch's float32 ones may be."""

    z: np.ndarray  # (n, n_bits) float64
    margin: np.ndarray  # (n, n_bits) float64: |torch's z - z| <= margin

    def uncertain(self) -> np.ndarray:
        """(n,) bool: some bit of the text is too close to 0 for its sign to be certain."""
        out: np.ndarray = (np.abs(self.z) <= self.margin + FLOOR).any(axis=1)
        return out


@dataclass(frozen=True)
class _Linear:
    """A Linear layer after the first: float32 weights as torch has them (exact in float64)."""

    weight_t: np.ndarray  # (in, out) float32, W^T
    bias: np.ndarray  # (out,) float64
    slack: float  # relative margin per term
    underflow: float  # absolute margin per output: (in + 1) * UNDERFLOW


class TextPath:
    """`HashingModel.encode_text` for bags of words given as their nonzero columns (and, when
    `weighted`, their float32 values; binary bags are ones).

    Holds a snapshot of the text network taken by `from_model` (build it after training) and the
    model itself, which encodes a batch when some text's sign is not certain. Read-only after
    construction: threads share it.
    """

    def __init__(self, model: HashingModel, *, weighted: bool = False) -> None:
        """Use `from_model`, which checks that the model can be reproduced (this does not)."""
        self.model = model
        self.weighted = weighted
        self.dim = model.text_dim
        self.n_bits = model.n_bits
        self.input_norm = model.input_norm
        self._mean = _numpy(model.text_mean)  # (dim,) float32
        self._std = _numpy(model.text_std)
        first, *rest = [m for m in model.text_net if isinstance(m, nn.Linear)]
        w1 = _numpy(first.weight)  # (hidden, dim) float32
        self._w1_t = np.ascontiguousarray(w1.T)  # (dim, hidden): a word's column is a row here
        b1 = _numpy(first.bias).astype(np.float64)
        # Absent words: torch computes (0 - mean) / std in float32 (l2 scaling leaves 0 at 0).
        self._s0 = (np.float32(0.0) - self._mean) / self._std  # (dim,) float32
        self._s0_64 = self._s0.astype(np.float64)  # the same numbers, as the kernel reads them
        s0, w1_64 = self._s0.astype(np.float64), w1.astype(np.float64)
        self._base = b1 + w1_64 @ s0  # (hidden,): the first layer of a text with no known word
        self._abs_base = np.abs(b1) + np.abs(w1_64) @ np.abs(s0)  # its sum of |terms|
        # Present words under zscore: (1 - mean) / std, one value per column.
        self._s1 = (np.float32(1.0) - self._mean) / self._std
        self._rest = [
            _Linear(
                weight_t=np.ascontiguousarray(_numpy(layer.weight).T),
                bias=_numpy(layer.bias).astype(np.float64),
                slack=_slack(layer.in_features),
                underflow=(layer.in_features + 1) * UNDERFLOW,
            )
            for layer in rest
        ]

    @classmethod
    def from_model(cls, model: HashingModel, *, weighted: bool = False) -> TextPath | None:
        """The fast path for `model` on binary bags (or `weighted` ones: values given), or None
        (with the reason logged) when it cannot be exact.

        Beyond the architecture, it compares its standardised values and its certain code bits
        with torch's on CHECK_TEXTS random word mixes (this also compiles the kernels).
        """
        reason = _unsupported(model)
        path = None if reason else cls(model, weighted=weighted)
        if path is not None:
            reason = path._differs_from_torch()
        if reason:
            logger.warning("text codes go through torch for every text: %s", reason)
            return None
        return path

    def standardised(
        self, indptr: np.ndarray, cols: np.ndarray, values: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per present word (CSR as in logits, `values` (nnz,) float32 or None for ones): (s1,
        e1, (n,) bool), s1 float64 within e1 of torch's standardised value (e1 = 0: it is
        torch's float32 number), and the texts left to torch (a norm too small to bound)."""
        n, zero = len(indptr) - 1, np.zeros(len(cols))
        to_torch = np.zeros(n, dtype=bool)
        if values is None and self.input_norm == "zscore":
            return self._s1[cols].astype(np.float64), zero, to_torch
        if values is None:
            # F.normalize: x / max(||x||, 1e-12) with ||x|| = sqrt(count) (a sum of ones is exact).
            counts = np.diff(indptr)
            norms = np.sqrt(np.maximum(counts, 1).astype(np.float32))  # no word: no value
            values = np.repeat(np.float32(1.0) / norms, counts)
        elif self.input_norm == "l2":
            return self._l2_values(indptr, cols, values)
        scaled = (values - self._mean[cols]) / self._std[cols]  # float32, as torch computes it
        return scaled.astype(np.float64), zero, to_torch

    def _l2_values(
        self, indptr: np.ndarray, cols: np.ndarray, values: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`standardised` of weighted values under "l2" (the bound: see the module docstring)."""
        counts = np.diff(indptr)
        text = np.repeat(np.arange(len(counts)), counts)  # (nnz,) the text of each word
        v = values.astype(np.float64)
        norms = np.sqrt(np.bincount(text, weights=v * v, minlength=len(counts)))  # (n,)
        to_torch = (counts > 0) & (norms < MIN_L2_NORM)
        r = v / np.maximum(norms, MIN_L2_NORM)[text]  # torch's x / max(||x||, 1e-12), exactly
        mean, std = self._mean[cols].astype(np.float64), self._std[cols].astype(np.float64)
        s1 = (r - mean) / std
        k = counts[text].astype(np.float64)
        e1 = (2 * U32 * ((k + 4) * np.abs(r) + 3 * np.abs(r - mean)) + 8 * U64 * np.abs(mean)) / std
        return s1, e1, to_torch

    def logits(
        self, columns: Sequence[np.ndarray], values: Sequence[np.ndarray] | None = None
    ) -> Logits:
        """z (n, n_bits) and its margin for texts given as sorted distinct columns (intp) and,
        for a `weighted` path, their float32 values (a text left to torch has margin inf)."""
        if (values is not None) != self.weighted:
            raise ValueError(f"expected values exactly for a weighted path ({self.weighted})")
        if len(columns) == 1:  # a query: no list-wide concatenation
            cols = columns[0]
            indptr = np.array([0, len(cols)], dtype=np.intp)
            vals = None if values is None else np.asarray(values[0], dtype=np.float32)
        else:
            indptr = np.zeros(len(columns) + 1, dtype=np.intp)
            indptr[1:] = np.cumsum(np.fromiter(map(len, columns), np.intp, len(columns)))
            cols = np.concatenate(columns) if columns else np.empty(0, dtype=np.intp)
            vals = None
            if values is not None:
                vals = np.concatenate(values).astype(np.float32, copy=False) if columns else None
        if vals is not None and vals.shape != cols.shape:
            raise ValueError(f"expected one value per column, got {vals.shape} for {cols.shape}")
        s1, e1, to_torch = self.standardised(indptr, cols, vals)
        a, m = _first_layer(
            indptr, cols, self._s0_64[cols], s1, e1, self._w1_t,
            self._base, self._abs_base, _slack(self.dim), (self.dim + 1) * UNDERFLOW,
        )  # fmt: skip
        for layer in self._rest:
            a, m = _dense_layer(a, m, layer.weight_t, layer.bias, layer.slack, layer.underflow)
        m[to_torch] = np.inf
        return Logits(a, m)

    def encode(
        self, columns: Sequence[np.ndarray], values: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        """(n, n_bits) int8 codes in {-1, +1}: those of `model.encode_text` on the dense vectors
        (ones at `columns`, or `values` there for a weighted path)."""
        logits = self.logits(columns, values)
        if logits.uncertain().any():
            return self.model.encode_text(self._dense(columns, values))
        return np.where(logits.z > 0, 1, -1).astype(np.int8)

    def encode_real(
        self, columns: Sequence[np.ndarray], values: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(codes (n, n_bits) int8 as `encode`, real (n, n_bits) float64): the hash layer's
        output before sign, tanh(z) L2-normalised, whose signs the codes are. From our float64
        z when every sign is certain; else from torch's float32 forward pass of the batch."""
        logits = self.logits(columns, values)
        if logits.uncertain().any():
            dense = torch.as_tensor(
                self._dense(columns, values), device=self.model.text_mean.device
            )
            with torch.inference_mode():
                real = self.model.hash_text(dense, binary=False).double().cpu().numpy()
            return np.where(real > 0, 1, -1).astype(np.int8), real
        squashed = np.tanh(logits.z)
        norms = np.maximum(np.linalg.norm(squashed, axis=1, keepdims=True), 1e-12)
        return np.where(logits.z > 0, 1, -1).astype(np.int8), squashed / norms

    def _dense(
        self, columns: Sequence[np.ndarray], values: Sequence[np.ndarray] | None = None
    ) -> np.ndarray:
        dense = np.zeros((len(columns), self.dim), dtype=np.float32)
        for t, (row, cols) in enumerate(zip(dense, columns, strict=True)):
            row[cols] = 1.0 if values is None else values[t]
        return dense

    def _differs_from_torch(self) -> str:
        """Why this path is not torch's on random word mixes, or "" when it is."""
        rng = np.random.default_rng(CHECK_SEED)
        sizes = rng.integers(0, min(self.dim, 64) + 1, size=CHECK_TEXTS)
        sizes[:2] = (0, self.dim)  # no word, every word
        columns = [np.sort(rng.choice(self.dim, size=s, replace=False)) for s in sizes]
        # Weighted: values spanning tf-idf's (0, 1] and log counts' [log 2, ...).
        values = None
        if self.weighted:
            values = [rng.uniform(0.01, 3.0, size=s).astype(np.float32) for s in sizes]
        dense = self._dense(columns, values)
        device = self.model.text_mean.device
        with torch.inference_mode():
            theirs = self.model.standardise_text(torch.as_tensor(dense, device=device))
        theirs_np = theirs.cpu().numpy()
        indptr = np.zeros(len(columns) + 1, dtype=np.intp)
        np.cumsum(sizes, out=indptr[1:])
        flat = None if values is None else np.concatenate(values)
        s1, e1, _ = self.standardised(indptr, np.concatenate(columns), flat)
        for t, cols in enumerate(columns):
            span = slice(indptr[t], indptr[t + 1])
            absent = np.ones(self.dim, dtype=bool)
            absent[cols] = False
            exact = np.array_equal(
                theirs_np[t, absent].view(np.uint32), self._s0[absent].view(np.uint32)
            )
            if not exact or (np.abs(theirs_np[t, cols] - s1[span]) > e1[span]).any():
                return "its standardised bag-of-words values differ from torch's in float32"
        logits = self.logits(columns, values)
        certain = ~logits.uncertain()
        codes = np.where(logits.z > 0, 1, -1).astype(np.int8)
        if not np.array_equal(codes[certain], self.model.encode_text(dense)[certain]):
            return "its codes differ from torch's on random word mixes"
        return ""


def _numpy(t: torch.Tensor) -> np.ndarray:
    out: np.ndarray = t.detach().cpu().numpy().copy()
    return out


def _unsupported(model: HashingModel) -> str:
    """Why `model`'s text network is not one this module reproduces exactly, or ""."""
    if type(model) is not HashingModel:
        return f"expected a HashingModel, got a {type(model).__name__} (it may encode otherwise)"
    if model.training:
        return "expected the model in eval mode (dropout is the identity only then)"
    if model.input_norm not in ("zscore", "l2"):
        return f"expected input_norm zscore or l2, got {model.input_norm!r}"
    precision = torch.get_float32_matmul_precision()
    if precision != "highest":
        return f"expected float32 matmul precision 'highest' (exact float32), got {precision!r}"
    modules = list(model.text_net) if isinstance(model.text_net, nn.Sequential) else []
    kinds = [type(m) for m in modules]
    # Linear, ReLU and an optional Dropout per hidden layer, then the last Linear.
    pos = 0
    while pos < len(kinds) - 1 and kinds[pos : pos + 2] == [nn.Linear, nn.ReLU]:
        pos += 3 if kinds[pos + 2 : pos + 3] == [nn.Dropout] else 2
    if not kinds or pos != len(kinds) - 1 or kinds[-1] is not nn.Linear:
        names = [k.__name__ for k in kinds]
        return f"expected (Linear, ReLU, Dropout?)* Linear as the text network, got {names}"
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    if any(m.bias is None for m in linears):
        return "expected every Linear layer of the text network with a bias"
    tensors = [*model.text_net.parameters(), model.text_mean, model.text_std]
    if any(t.dtype != torch.float32 for t in tensors):
        return "expected float32 weights and statistics"
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        return "expected finite weights and statistics"
    if not bool((model.text_std > 0).all()):
        return "expected a positive text_std"
    return ""
