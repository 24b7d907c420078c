"""What every search backend returns: one padding and one order.

Results follow FAISS: (dists int32 (m, k), ids int64 (m, k)) by distance, ties in insertion
order, padded with distance int32 max and id -1 where fewer than k codes exist. The scan-based
backends (HammingIndex, MultiIndexHamming) keep candidates as int64 keys
`(distance << POS_BITS) | position` (indexes/kernels.py); `empty_keys` and `from_keys` are the
start and the end of every such search, `padded` the start of one that fills rows itself
(the store's views and filters), so the padding and order rules are written once.
"""

from __future__ import annotations

import numpy as np

from indexes.kernels import POS_BITS, POS_MASK

PAD_DIST = np.iinfo(np.int32).max  # the distance of a padding slot
PAD_ID = -1  # the id of a padding slot


def padded(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(dists, ids) of m rows of k padding slots, to be filled from the left."""
    return np.full((m, k), PAD_DIST, dtype=np.int32), np.full((m, k), PAD_ID, dtype=np.int64)


def empty_keys(m: int, heap_k: int, n_bits: int) -> np.ndarray:
    """(m, heap_k) int64 candidate heaps, each slot a sentinel that every real code beats."""
    sentinel = ((n_bits + 1) << POS_BITS) | POS_MASK
    return np.full((m, heap_k), sentinel, dtype=np.int64)


def from_keys(keys: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(dists, ids) (m, k) from (m, heap_k <= k) candidate keys: sorted (distance, then
    position: insertion order), positions mapped through `ids`, padded past heap_k.

    Every slot of `keys` must hold a real candidate (heap_k is at most the number of codes that
    can be found), except where the caller overwrites the row afterwards (MIH's fallback rows).
    """
    keys = np.sort(keys, axis=1)
    m, heap_k = keys.shape
    dists, out_ids = padded(m, k)
    dists[:, :heap_k] = keys >> POS_BITS
    if ids.size:
        out_ids[:, :heap_k] = ids[np.minimum(keys & POS_MASK, ids.size - 1)]
    return dists, out_ids
