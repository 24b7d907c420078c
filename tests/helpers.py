"""Helpers that several test files share (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np

from indexes.codes import pack_codes
from indexes.results import PAD_DIST
from models.data.dataset import PairDataset
from store import sections
from store.legacy import INDEX_LAYOUT
from store.manifest import Manifest


def store_manifest(n_bits: int) -> Manifest:
    """The manifest of a store made by the tests, not by a trained checkpoint."""
    return Manifest(
        n_bits=n_bits,
        image_backbone="test-backbone",
        vocabulary_sha256="0" * 64,
        checkpoint_sha256="1" * 64,
        created=0.0,
    )


def random_packed(rng: np.random.Generator, n: int, n_bits: int) -> np.ndarray:
    """(n, n_words) uint64 random codes of n_bits bits."""
    return pack_codes(rng.integers(0, 2, size=(n, n_bits), dtype=np.uint8))


def brute_force(
    queries: np.ndarray, codes: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: full distance matrix, stable sort (ties in insertion order), FAISS padding."""
    dist = np.bitwise_count(queries[:, None, :] ^ codes[None, :, :]).sum(axis=2).astype(np.int32)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]  # (m, min(k, n))
    out_d = np.full((queries.shape[0], k), PAD_DIST, dtype=np.int32)
    out_i = np.full((queries.shape[0], k), -1, dtype=np.int64)
    out_d[:, : order.shape[1]] = np.take_along_axis(dist, order, axis=1)
    out_i[:, : order.shape[1]] = ids[order]
    return out_d, out_i


def separable_pairs(n: int = 600, classes: int = 6, seed: int = 0) -> PairDataset:
    """Pairs whose image and text features both come from a per-class non-negative prototype."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    proto_i, proto_t = rng.random((classes, 40)) ** 4, rng.random((classes, 25)) ** 4
    image = proto_i[y] + 0.15 * rng.random((n, 40))
    text = proto_t[y] + 0.15 * rng.random((n, 25))
    idx = np.arange(n, dtype=np.int64)
    return PairDataset(
        name="synthetic", ids=[str(i) for i in idx], labels=np.eye(classes, dtype=np.uint8)[y],
        train_idx=idx[100:], query_idx=idx[:100], database_idx=idx[100:],
        image_features=image.astype(np.float32), text_features=text.astype(np.float32),
    )  # fmt: skip


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, object]:
    """The job's status once it has succeeded or failed (a TestClient is an httpx.Client too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, object] = client.get(f"/v1/jobs/{job_id}").json()
        if status["status"] in ("succeeded", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def write_legacy_index(path: Path, *, n_bits: int, ids: np.ndarray, codes: np.ndarray) -> None:
    """A Hamming index file of the earlier design (what store/legacy.py migrates): nothing but
    the tests writes one any more."""
    sections.write(path, INDEX_LAYOUT, n_bits=n_bits, arrays=[np.asarray(ids, np.int64), codes])
