"""Unsupervised cross-modal baselines on precomputed features, with the same shape as AUCMH.

Binary methods: `fit(image, text, *, n_bits, seed) -> self`, then `encode_image(x)` and
`encode_text(x)` give (n, n_bits) int8 codes in {-1, +1} (sign(0) = +1). The real-valued reference
`CCA` has `fit(image, text)` and `embed_image` / `embed_text` (float64 rows ranked by cosine).
Every statistic (means, scales, projections, rotations) comes from the training rows given to fit.

A shared space of CCA has at most c = min(d_img, d_txt) dimensions (10 on Wikipedia, whose text
is 10-d LDA). Where a method needs more bits than that, the extra bits are signs of seeded random
Gaussian projections of the shared space, as in LSH; this is stated per class.

A tuned run fits the same method on the same rows many times (every regulariser on the grid, its
widening, every code length, the refit on the whole training part), and CVH, LSH, CCA-ITQ and
CCA all start from the same CCA. `FitCache` keeps what those fits share: per fit set the
covariances (CCA) and the Gram matrices (CMFH), per fit set and ridge the CCA directions.

Over 300 lines because the five baselines share CCA and the cache; each class is short.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import scipy.linalg

from common.errors import InputError

CCA_RIDGE = 1e-3  # default ridge on each covariance, relative to its mean eigenvalue
CCA_MAX_COMPONENTS = 128  # components kept by the real-valued CCA reference
ITQ_ITERATIONS = 50  # Gong et al. report convergence within 50 iterations
ITQ_EIGEN_POWER = 4.0  # CCA-ITQ scales each direction by correlation**p; Gong et al. use p = 4
CMFH_LAMBDA = 0.5  # weight of image vs text reconstruction (Ding et al.: 0.5)
CMFH_MU = 100.0  # weight of the projection terms (Ding et al.: 100)
CMFH_GAMMA = 0.01  # default ridge on every factor (Ding et al.: 0.01)
CMFH_ITERATIONS = 50  # alternating updates; the objective is flat well before this


class FitCache:
    """Results of the baselines' expensive steps, keyed by the exact input they came from.

    A key holds a digest of the bytes, shape and dtype of every matrix a step reads and the
    regulariser, so a hit returns what the same expression on the same input returned: fits are
    bit-identical with and without the cache, and a value can only be reused for identical data
    (another seed's validation split, another dataset or another scaling is another key). Cached
    arrays are read-only. One cache per `cmh evaluate` run (models/methods/compare.py): it holds
    a few covariance matrices per fit set and the (d, c) directions, not one (d, d) per ridge.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[object, ...], tuple[np.ndarray, ...]] = {}
        self.hits = 0  # lookups answered from the cache
        self.misses = 0  # lookups computed (and stored)

    def get(
        self, key: tuple[object, ...], compute: Callable[[], tuple[np.ndarray, ...]]
    ) -> tuple[np.ndarray, ...]:
        """The stored value of `key`, or `compute()` stored under it (its arrays made read-only)."""
        found = self._store.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        value = compute()
        for arr in value:
            arr.setflags(write=False)  # shared between fits: nobody may change it in place
        self._store[key] = value
        return value


def digest(x: np.ndarray) -> str:
    """A content key for `x`: BLAKE2b of its shape, dtype and bytes."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{x.shape}{x.dtype.str}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def to_codes(z: np.ndarray) -> np.ndarray:
    """Signs (n, L) int8 in {-1, +1} of real projections, with sign(0) = +1."""
    return np.where(z >= 0, 1, -1).astype(np.int8)


class _Features:
    """Centring (and optional RMS scaling) of one modality, from training rows only."""

    def __init__(self, x: np.ndarray, *, name: str, scale: bool) -> None:
        if x.ndim != 2 or x.shape[0] < 2:
            raise InputError(f"expected {name} features of shape (n >= 2, d), got {x.shape}")
        x = x.astype(np.float64)
        self.name = name
        self.dim = x.shape[1]
        self.mean = x.mean(axis=0)  # (d,)
        rms = float(np.sqrt(np.mean(np.sum((x - self.mean) ** 2, axis=1))))
        self.scale = rms if scale and rms > 0 else 1.0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(
                f"expected {self.name} features of shape (n, {self.dim}), got {x.shape}"
            )
        return np.asarray((x.astype(np.float64) - self.mean) / self.scale)


def _check_pairs(image: np.ndarray, text: np.ndarray, n_bits: int) -> None:
    if image.shape[0] != text.shape[0]:
        raise InputError(
            f"expected paired rows, got {image.shape[0]} images, {text.shape[0]} texts"
        )
    if n_bits < 1:
        raise InputError(f"expected n_bits >= 1, got {n_bits}")


def _inverse_sqrt(cov: np.ndarray, ridge: float) -> np.ndarray:
    """(cov + r I)^(-1/2), r = ridge times the mean eigenvalue of cov (symmetric, positive)."""
    shift = ridge * float(np.trace(cov)) / cov.shape[0] + 1e-12
    vals, vecs = np.linalg.eigh(cov + shift * np.eye(cov.shape[0]))
    return np.asarray((vecs / np.sqrt(vals)) @ vecs.T)


def cca_directions(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_components: int,
    ridge: float = CCA_RIDGE,
    cache: FitCache | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regularised CCA of centred x (n, dx), y (n, dy): A (dx, c), B (dy, c), correlations (c,).

    Hotelling's CCA by whitening and an SVD of the whitened cross-covariance; c is n_components
    capped at min(dx, dy), directions sorted by decreasing correlation. The ridge matters when
    d is near or above n (bag-of-words, CNN features): unregularised CCA then finds perfect,
    meaningless correlations. With a `cache`, the covariances are computed once per (x, y) and
    the directions once per (x, y, ridge, c): CVH, LSH, CCA-ITQ and CCA share them.
    """
    if ridge < 0:
        raise InputError(f"expected ridge >= 0, got {ridge}")
    c = min(n_components, x.shape[1], y.shape[1])
    if cache is None:
        return _cca_directions(_covariances(x, y), c, ridge)
    store = cache  # a name the closure below sees as not None
    keys = (digest(x), digest(y))

    def compute() -> tuple[np.ndarray, ...]:
        return _cca_directions(store.get(("cov", *keys), lambda: _covariances(x, y)), c, ridge)

    a, b, s = store.get(("cca", *keys, ridge, c), compute)
    return a, b, s


def _covariances(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Cxx (dx, dx), Cyy (dy, dy), Cxy (dx, dy)) of centred rows."""
    n = x.shape[0]
    return x.T @ x / n, y.T @ y / n, x.T @ y / n


def _cca_directions(
    covs: tuple[np.ndarray, ...], c: int, ridge: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cxx, cyy, cxy = covs
    wx = _inverse_sqrt(cxx, ridge)
    wy = _inverse_sqrt(cyy, ridge)
    u, s, vt = np.linalg.svd(wx @ cxy @ wy, full_matrices=False)
    return wx @ u[:, :c], wy @ vt.T[:, :c], s[:c]


def _lift(z: np.ndarray, n_bits: int, rng: np.random.Generator) -> np.ndarray:
    """(c, n_bits - c) Gaussian directions for the bits the shared space cannot give alone."""
    return rng.standard_normal((z.shape[1], n_bits - z.shape[1]))


class CVH:
    """Cross-View Hashing (Kumar and Udupa, IJCAI 2011): with paired views only, its generalised
    eigenproblem is CCA, so bit b is the sign of the b-th canonical projection."""

    def __init__(self, *, ridge: float = CCA_RIDGE) -> None:
        self.ridge = ridge  # CCA covariance ridge, relative (see cca_directions)

    def fit(
        self,
        image: np.ndarray,
        text: np.ndarray,
        *,
        n_bits: int,
        seed: int,
        cache: FitCache | None = None,
    ) -> CVH:
        """Learn the projections; bits beyond the c canonical directions are random (see module)."""
        _check_pairs(image, text, n_bits)
        self._image = _Features(image, name="image", scale=False)
        self._text = _Features(text, name="text", scale=False)
        a, b, _ = cca_directions(
            self._image(image), self._text(text), n_components=n_bits, ridge=self.ridge, cache=cache
        )
        if a.shape[1] < n_bits:
            extra = _lift(a, n_bits, np.random.default_rng(seed))
            a, b = np.hstack([a, a @ extra]), np.hstack([b, b @ extra])
        self._a, self._b = a, b
        return self

    def encode_image(self, x: np.ndarray) -> np.ndarray:
        """Image codes (n, n_bits) int8 in {-1, +1}."""
        return to_codes(self._image(x) @ self._a)

    def encode_text(self, x: np.ndarray) -> np.ndarray:
        """Text codes (n, n_bits) int8 in {-1, +1}."""
        return to_codes(self._text(x) @ self._b)


class LSH:
    """Cross-modal SimHash (Charikar, STOC 2002): signs of random Gaussian projections after
    centring, drawn in the shared CCA space (top min(L, c) directions), because random projections
    of two unrelated input spaces would carry no cross-modal information at all."""

    def __init__(self, *, ridge: float = CCA_RIDGE) -> None:
        self.ridge = ridge  # CCA covariance ridge, relative (see cca_directions)

    def fit(
        self,
        image: np.ndarray,
        text: np.ndarray,
        *,
        n_bits: int,
        seed: int,
        cache: FitCache | None = None,
    ) -> LSH:
        """Learn the shared space and draw the n_bits random hyperplanes."""
        _check_pairs(image, text, n_bits)
        self._image = _Features(image, name="image", scale=False)
        self._text = _Features(text, name="text", scale=False)
        a, b, _ = cca_directions(
            self._image(image), self._text(text), n_components=n_bits, ridge=self.ridge, cache=cache
        )
        planes = np.random.default_rng(seed).standard_normal((a.shape[1], n_bits))
        self._a, self._b = a @ planes, b @ planes
        return self

    def encode_image(self, x: np.ndarray) -> np.ndarray:
        """Image codes (n, n_bits) int8 in {-1, +1}."""
        return to_codes(self._image(x) @ self._a)

    def encode_text(self, x: np.ndarray) -> np.ndarray:
        """Text codes (n, n_bits) int8 in {-1, +1}."""
        return to_codes(self._text(x) @ self._b)


def itq_rotation(v: np.ndarray, *, iterations: int, rng: np.random.Generator) -> np.ndarray:
    """Iterative quantisation (Gong and Lazebnik, CVPR 2011): orthogonal R (L, L) that minimises
    ||sign(V R) - V R||^2 for zero-mean V (n, L), from a seeded random rotation."""
    r, _ = np.linalg.qr(rng.standard_normal((v.shape[1], v.shape[1])))
    for _ in range(iterations):
        b = np.where(v @ r >= 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(b.T @ v)  # Procrustes: R = W U^T for B^T V = U S W^T
        r = wt.T @ u.T
    return r


class CCAITQ:
    """CCA-ITQ (Gong, Lazebnik, Gordo and Perronnin, TPAMI 2013): top-L CCA directions scaled by
    correlation**4, then one ITQ rotation learned on both modalities' training embeddings."""

    def __init__(self, *, ridge: float = CCA_RIDGE) -> None:
        self.ridge = ridge  # CCA covariance ridge, relative (see cca_directions)

    def fit(
        self,
        image: np.ndarray,
        text: np.ndarray,
        *,
        n_bits: int,
        seed: int,
        cache: FitCache | None = None,
    ) -> CCAITQ:
        """Learn the scaled CCA projections (lifted to n_bits when c < n_bits) and the rotation."""
        _check_pairs(image, text, n_bits)
        self._image = _Features(image, name="image", scale=False)
        self._text = _Features(text, name="text", scale=False)
        xi, xt = self._image(image), self._text(text)
        a, b, corr = cca_directions(xi, xt, n_components=n_bits, ridge=self.ridge, cache=cache)
        weights = corr**ITQ_EIGEN_POWER
        a, b = a * weights, b * weights
        rng = np.random.default_rng(seed)
        if a.shape[1] < n_bits:
            lift = np.hstack([np.eye(a.shape[1]), _lift(a, n_bits, rng)])  # (c, n_bits)
            a, b = a @ lift, b @ lift
        rotation = itq_rotation(np.vstack([xi @ a, xt @ b]), iterations=ITQ_ITERATIONS, rng=rng)
        self._a, self._b = a @ rotation, b @ rotation
        return self

    def encode_image(self, x: np.ndarray) -> np.ndarray:
        """Image codes (n, n_bits) int8 in {-1, +1}."""
        return to_codes(self._image(x) @ self._a)

    def encode_text(self, x: np.ndarray) -> np.ndarray:
        """Text codes (n, n_bits) int8 in {-1, +1}."""
        return to_codes(self._text(x) @ self._b)


class CMFH:
    """Collective Matrix Factorization Hashing (Ding, Guo and Zhou, CVPR 2014): X_m ~ U_m V with
    one latent V shared by both modalities and linear hash functions V ~ P_m X_m, by the paper's
    closed-form alternating updates; codes are sign(P_m x) on centred, RMS-scaled features."""

    def __init__(self, *, gamma: float = CMFH_GAMMA) -> None:
        if gamma <= 0:
            raise InputError(f"expected gamma > 0, got {gamma}")
        self.gamma = gamma  # ridge on every factor; needs raising when d is near or above n

    def fit(
        self,
        image: np.ndarray,
        text: np.ndarray,
        *,
        n_bits: int,
        seed: int,
        cache: FitCache | None = None,
    ) -> CMFH:
        """Run the alternating updates from a seeded random V."""
        _check_pairs(image, text, n_bits)
        self._image = _Features(image, name="image", scale=True)
        self._text = _Features(text, name="text", scale=True)
        x1, x2 = self._image(image).T, self._text(text).T  # (d1, n), (d2, n)
        lam, mu, gamma = CMFH_LAMBDA, CMFH_MU, self.gamma
        eye = np.eye(n_bits)
        # P_m = V X_m^T (X_m X_m^T + gamma/mu I)^-1: the factor depends on X_m only, so solve once.
        gram1, gram2 = _grams(x1, x2, cache)
        chol1 = scipy.linalg.cho_factor(gram1 + gamma / mu * np.eye(x1.shape[0]))
        chol2 = scipy.linalg.cho_factor(gram2 + gamma / mu * np.eye(x2.shape[0]))
        v = np.random.default_rng(seed).standard_normal((n_bits, x1.shape[1]))  # (L, n)
        for _ in range(CMFH_ITERATIONS):
            vvt = v @ v.T
            u1 = np.linalg.solve(vvt + gamma / lam * eye, v @ x1.T).T  # (d1, L)
            u2 = np.linalg.solve(vvt + gamma / (1 - lam) * eye, v @ x2.T).T  # (d2, L)
            p1 = scipy.linalg.cho_solve(chol1, x1 @ v.T).T  # (L, d1)
            p2 = scipy.linalg.cho_solve(chol2, x2 @ v.T).T  # (L, d2)
            lhs = lam * u1.T @ u1 + (1 - lam) * u2.T @ u2 + (2 * mu + gamma) * eye
            rhs = lam * u1.T @ x1 + (1 - lam) * u2.T @ x2 + mu * (p1 @ x1 + p2 @ x2)
            v = np.linalg.solve(lhs, rhs)
        self._p1 = scipy.linalg.cho_solve(chol1, x1 @ v.T)  # (d1, L)
        self._p2 = scipy.linalg.cho_solve(chol2, x2 @ v.T)  # (d2, L)
        return self

    def encode_image(self, x: np.ndarray) -> np.ndarray:
        """Image codes (n, n_bits) int8 in {-1, +1}."""
        return to_codes(self._image(x) @ self._p1)

    def encode_text(self, x: np.ndarray) -> np.ndarray:
        """Text codes (n, n_bits) int8 in {-1, +1}."""
        return to_codes(self._text(x) @ self._p2)


def _grams(x1: np.ndarray, x2: np.ndarray, cache: FitCache | None) -> tuple[np.ndarray, ...]:
    """(X1 X1^T, X2 X2^T) of CMFH's (d, n) feature matrices, once per fit set with a cache."""

    def compute() -> tuple[np.ndarray, ...]:
        return x1 @ x1.T, x2 @ x2.T

    return compute() if cache is None else cache.get(("gram", digest(x1), digest(x2)), compute)


class CCA:
    """Real-valued CCA (Hotelling 1936; the cross-modal reference of Rasiwasia et al., ACM MM
    2010): centred features projected on the top canonical directions, ranked by cosine."""

    def __init__(self, *, ridge: float = CCA_RIDGE) -> None:
        self.ridge = ridge  # CCA covariance ridge, relative (see cca_directions)

    def fit(self, image: np.ndarray, text: np.ndarray, *, cache: FitCache | None = None) -> CCA:
        """Learn the top min(d_img, d_txt, CCA_MAX_COMPONENTS) canonical directions."""
        _check_pairs(image, text, 1)
        self._image = _Features(image, name="image", scale=False)
        self._text = _Features(text, name="text", scale=False)
        self._a, self._b, self.correlations = cca_directions(
            self._image(image),
            self._text(text),
            n_components=CCA_MAX_COMPONENTS,
            ridge=self.ridge,
            cache=cache,
        )
        return self

    def embed_image(self, x: np.ndarray) -> np.ndarray:
        """Image embeddings (n, c) float64 in the shared space."""
        return np.asarray(self._image(x) @ self._a)

    def embed_text(self, x: np.ndarray) -> np.ndarray:
        """Text embeddings (n, c) float64 in the shared space."""
        return np.asarray(self._text(x) @ self._b)
