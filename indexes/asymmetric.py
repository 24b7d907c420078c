"""Asymmetric scoring: stored binary codes ranked by their inner product with a real query.

The query is the network's real-valued hash-layer output q (tanh, L2-normalised, before sign),
the stored items stay binary codes b in {-1, +1}^n (Gordo, Perronnin, Gong, Lazebnik, "Asymmetric
distances for binary embeddings", TPAMI 2014). With h the query's signs and S = sum |q_j|,

    <q, b> = S - 2 wd(b),    wd(b) = sum of |q_j| over the bits j where b differs from h,

so ranking by the inner product (highest first) is ranking by the weighted Hamming distance wd
(smallest first), and an item at Hamming distance d from h has wd between the sum of the d
smallest |q_j| and the sum of the d largest: the scan (indexes/kernels.py, asym_scan) sums a
code's wd only when the first bound can still beat its current k-th hit.

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

import numpy as np

from common.errors import InputError
from indexes.codes import check_packed, n_words, pack_codes, unpack_codes
from indexes.kernels import POS_BITS

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
    heavy: np.ndarray  # (m, n_words) uint64: the bits of the larger half of the weights
    low_light: np.ndarray  # (m, n_bits + 1) int64: `lower` within the other bits (then flat)
    low_heavy: np.ndarray  # (m, n_bits + 1) int64: `lower` within the heavy bits (then flat)

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
        positive = unpack_codes(signs, n_bits) > 0  # (m, n_bits) h_j = +1
        agree = np.where(positive, q > 0, q <= 0)
        magnitude = np.where(agree, np.abs(q), 0.0)
        total = magnitude.sum(axis=1)  # (m,) S
        scale = WEIGHT_TOTAL / np.where(total > 0, total, 1.0)
        weights = np.rint(magnitude * scale[:, None]).astype(np.int64)
        n_bytes = -(-n_bits // 8)
        per_byte = np.zeros((m, n_bytes * 8), dtype=np.int64)
        per_byte[:, :n_bits] = weights
        # tables[i, B, v] = sum of the weights of the bits set in byte value v of byte B.
        tables = np.einsum("vt,mbt->mbv", _BYTE_BITS.astype(np.int64), per_byte.reshape(m, -1, 8))
        order = np.argsort(weights, axis=1, kind="stable")  # (m, n_bits) lightest first
        is_heavy = np.zeros((m, n_bits), dtype=bool)
        np.put_along_axis(is_heavy, order[:, n_bits // 2 :], True, axis=1)
        light_w, heavy_w = np.where(is_heavy, 0, weights), np.where(is_heavy, weights, 0)
        return cls(
            np.ascontiguousarray(signs),
            weights,
            scale,
            np.ascontiguousarray(tables.astype(np.int32)),
            _smallest_sums(weights, np.ones_like(is_heavy)),
            pack_codes(is_heavy),
            _smallest_sums(light_w, ~is_heavy),
            _smallest_sums(heavy_w, is_heavy),
        )

    def rows(self, start: int, stop: int) -> Asymmetric:
        """The queries start..stop-1."""
        return Asymmetric(*(getattr(self, f.name)[start:stop] for f in fields(self)))

    def kernel_args(self) -> tuple[np.ndarray, ...]:
        """What asym_scan (indexes/kernels.py) takes after the live mask, but the radii."""
        return (self.tables, self.lower, self.heavy, self.low_light, self.low_heavy)

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


def _smallest_sums(weights: np.ndarray, among: np.ndarray) -> np.ndarray:
    """(m, n_bits + 1) int64: per row, the sum of the d smallest weights where `among` is
    True, for each d (past their count: all of them)."""
    m, n_bits = weights.shape
    ranked = np.sort(np.where(among, weights, np.iinfo(np.int64).max), axis=1)
    ranked[ranked == np.iinfo(np.int64).max] = 0
    out = np.zeros((m, n_bits + 1), dtype=np.int64)
    np.cumsum(ranked, axis=1, out=out[:, 1:])
    return out


def hamming_scores(dists: np.ndarray, n_bits: int) -> np.ndarray:
    """The cosines of two n_bits-bit codes at these Hamming distances: 1 - 2 d / n_bits."""
    out: np.ndarray = 1.0 - 2.0 * np.asarray(dists, dtype=np.float64) / n_bits
    return out


def full_radius(m: int, n_bits: int) -> np.ndarray:
    """(m,) int64 radii that keep every code."""
    n_words(n_bits)
    return np.full(m, n_bits, dtype=np.int64)
