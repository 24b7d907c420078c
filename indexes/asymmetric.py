"""Asymmetric scoring: stored binary codes ranked by their inner product with a real query.

The query is the network's real-valued hash-layer output q (tanh, L2-normalised, before sign),
the stored items stay binary codes b in {-1, +1}^n (Gordo, Perronnin, Gong, Lazebnik, "Asymmetric
distances for binary embeddings", TPAMI 2014). With h the query's signs and S = sum |q_j|,

    <q, b> = S - 2 wd(b),    wd(b) = sum of |q_j| over the bits j where b differs from h,

so ranking by the inner product (highest first) is ranking by the weighted Hamming distance wd
(smallest first). The scan (indexes/kernels.py, asym_scan) sums a code's wd only when a lower
bound of it can still beat its current k-th hit: the weights divided by a unit and rounded
down to PLANES bits, summed over the differing bits with PLANES popcounts (vectorised), times
the unit. (The issue's bound, wd >= the sum of the d smallest |q_j| for an item at Hamming
distance d, is what the Milvus store proves its candidates with: `lower`. In the scan it left
a median of 0.6% (up to 8%) of a million learned 64-bit codes to sum and 19% (up to 55%) of
uniform ones, against 0.02% (up to 0.2%) of either with 3 planes.)

The weights are integers: w_j = round(|q_j| * scale) with scale = WEIGHT_TOTAL / S, so every wd
is an exact integer (at most WEIGHT_TOTAL + n_bits / 2 < 2**23, the distance field of a scan
key), equal whatever the order of its sum; ties are then real ties, broken by insertion order as
in every other search, and a brute-force oracle can reproduce each answer exactly. The score the
search ranks by and reports is the cosine between the rounded query q' = sign(h) w / scale and
the code: <q', b> / sqrt(n_bits) = (sum w - 2 wd) / (scale sqrt(n_bits)), within
sqrt(n_bits) / (2 scale) = S sqrt(n_bits) / 2**23 of <q, b> / sqrt(n_bits) (4e-6 at 64 bits).
A bit whose q_j has not the sign of h_j (a q_j at 0, or one that rounding put on the other side
of 0 than the code the caller gives) weighs 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numba
import numpy as np

from common.errors import InputError
from indexes.codes import check_packed, n_words
from indexes.kernels import PLANES, POS_BITS

WEIGHT_TOTAL = 1 << 22  # sum of a query's integer weights (before rounding)
WD_SENTINEL = (1 << (63 - POS_BITS)) - 1  # the weighted distance of an empty heap slot
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")


@dataclass(frozen=True)
class Asymmetric:
    """The queries of an asymmetric search: signs, integer weights and the kernel's tables."""

    signs: np.ndarray  # (m, n_words) uint64: the packed codes h
    weights: np.ndarray  # (m, n_bits) int64: w_j >= 0
    scale: np.ndarray  # (m,) float64: integer units per unit of q
    tables: np.ndarray  # (m, n_bytes, 256) int32: weight of each value of each byte of h ^ b
    lower: np.ndarray  # (m, n_bits + 1) int64: the d smallest weights summed, for each d
    planes: np.ndarray  # (m, PLANES, n_words) uint64: bit p of each weight // unit
    units: np.ndarray  # (m,) int64: the coarse weights' unit (they are below 2**PLANES)

    @property
    def n_bits(self) -> int:
        """Bits per code."""
        return int(self.weights.shape[1])

    @classmethod
    def of(cls, signs: np.ndarray, q: np.ndarray) -> Asymmetric:
        """The search of packed codes `signs` (m, n_words) weighted by real queries q
        (m, n_bits): each row's hash-layer output, whose signs the codes are."""
        q = np.asarray(q, dtype=np.float64)
        if q.ndim != 2:
            raise InputError(f"expected real queries of shape (m, n_bits), got {q.shape}")
        m, n_bits = q.shape
        check_packed(signs, n_bits, name="query signs")
        if signs.shape[0] != m:
            raise InputError(f"expected {m} query codes, got {signs.shape[0]}")
        if not np.isfinite(q).all():
            raise InputError("expected finite real queries, got NaN or infinity")
        words = signs.shape[1]
        n_bytes = -(-n_bits // 8)
        weights = np.zeros((m, n_bits), dtype=np.int64)
        scale = np.zeros(m, dtype=np.float64)
        tables = np.zeros((m, n_bytes, 256), dtype=np.int32)
        lower = np.zeros((m, n_bits + 1), dtype=np.int64)
        planes = np.zeros((m, PLANES, words), dtype=np.uint64)
        units = np.zeros(m, dtype=np.int64)
        signs = np.ascontiguousarray(signs)
        _prepare(signs, q, weights, scale, tables, lower, planes, units)
        return cls(signs, weights, scale, tables, lower, planes, units)

    def rows(self, start: int, stop: int) -> Asymmetric:
        """The queries start..stop-1."""
        return Asymmetric(*(getattr(self, f.name)[start:stop] for f in fields(self)))

    def kernel_args(self) -> tuple[np.ndarray, ...]:
        """What asym_scan (indexes/kernels.py) takes after the live mask, but the radii."""
        return (self.tables, self.planes, self.units)

    def distances(self, row: int, codes: np.ndarray) -> np.ndarray:
        """(n,) int64 weighted distances of (n, n_words) packed codes to query `row`."""
        x = (np.ascontiguousarray(codes) ^ self.signs[row]).astype("<u8", copy=False)
        n_bytes = self.tables.shape[1]
        as_bytes = x.view(np.uint8).reshape(codes.shape[0], 8 * x.shape[1])[:, :n_bytes]
        picked = self.tables[row][np.arange(n_bytes), as_bytes]  # (n, n_bytes)
        return picked.sum(axis=1, dtype=np.int64)  # type: ignore[no-any-return]

    def scores(self, wd: np.ndarray) -> np.ndarray:
        """(m, k) float64 cosines of the rounded queries and the codes at weighted distances
        wd (m, k) (see the module docstring)."""
        total = self.weights.sum(axis=1)[:, None]
        out: np.ndarray = (total - 2.0 * wd) / (self.scale[:, None] * np.sqrt(self.n_bits))
        return out


@numba.njit(nogil=True, cache=True)
def _prepare(
    signs: np.ndarray,
    q: np.ndarray,
    weights: np.ndarray,
    scale: np.ndarray,
    tables: np.ndarray,
    lower: np.ndarray,
    planes: np.ndarray,
    units: np.ndarray,
) -> None:  # pragma: no cover (compiled)
    """Fill the arrays of Asymmetric.of for each query (one compiled call: a query costs
    microseconds on the hot path, not a hundred NumPy calls)."""
    m, n_bits = q.shape
    for i in range(m):
        total = 0.0
        for j in range(n_bits):
            positive = (signs[i, j >> 6] >> np.uint64(j & 63)) & np.uint64(1)
            if (q[i, j] > 0.0) == (positive == 1):  # the weight of a bit that agrees with h
                total += abs(q[i, j])
        scale[i] = WEIGHT_TOTAL / total if total > 0.0 else float(WEIGHT_TOTAL)
        for j in range(n_bits):
            positive = (signs[i, j >> 6] >> np.uint64(j & 63)) & np.uint64(1)
            if (q[i, j] > 0.0) == (positive == 1):
                weights[i, j] = np.int64(np.rint(abs(q[i, j]) * scale[i]))
        # tables[i, B, v]: the weight of the bits set in byte value v of byte B, built from v
        # without its lowest set bit.
        for byte in range(tables.shape[1]):
            for v in range(1, 256):
                bit = 8 * byte + _lowest_bit(v)
                tables[i, byte, v] = tables[i, byte, v & (v - 1)] + (
                    weights[i, bit] if bit < n_bits else 0
                )
        ranked = np.sort(weights[i])
        for d in range(n_bits):
            lower[i, d + 1] = lower[i, d] + ranked[d]
        # Coarse weights below 2**PLANES: weight // unit <= weight / unit, so their sum times
        # the unit never exceeds the weighted distance.
        units[i] = ranked[-1] // ((1 << PLANES) - 1) + 1
        for j in range(n_bits):
            coarse = weights[i, j] // units[i]
            for plane in range(PLANES):
                if (coarse >> plane) & 1:
                    planes[i, plane, j >> 6] |= np.uint64(1) << np.uint64(j & 63)


@numba.njit(inline="always")
def _lowest_bit(v: int) -> int:  # pragma: no cover (compiled)
    """The index of the lowest set bit of v > 0."""
    index = 0
    while not (v >> index) & 1:
        index += 1
    return index


def hamming_scores(dists: np.ndarray, n_bits: int) -> np.ndarray:
    """The cosines of two n_bits-bit codes at these Hamming distances: 1 - 2 d / n_bits."""
    out: np.ndarray = 1.0 - 2.0 * np.asarray(dists, dtype=np.float64) / n_bits
    return out


def full_radius(m: int, n_bits: int) -> np.ndarray:
    """(m,) int64 radii that keep every code."""
    n_words(n_bits)
    return np.full(m, n_bits, dtype=np.int64)
