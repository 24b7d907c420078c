"""Write a tiny segment file and a tiny Hamming index file (.hidx) in format version 1, with the
code that wrote each before store/sections.py took over their headers.

Run it inside an export of a commit that has indexes/storage.py, never on today's tree:

    mkdir /tmp/files-v1 && git archive 48c6a90 | tar -x -C /tmp/files-v1
    (cd /tmp/files-v1 && PYTHONPATH=. python $REPO/tests/data/make_files_v1.py $REPO/tests/data)

It writes segment-v1.seg (5 rows of 72-bit codes, seqs 3, 4, 9, 10, 11) and index-v1.hidx (its
image codes under ids 50, 7, 12, 99, 0), which tests/test_file_formats.py reads with today's
code and writes again byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from indexes import storage
from indexes.codes import pack_codes
from store.segment import SegmentData, write_segment

N_BITS = 72
SEQS = [3, 4, 9, 10, 11]
IDS = [50, 7, 12, 99, 0]


def codes(seed: int) -> np.ndarray:
    """5 packed N_BITS-bit codes from a fixed generator."""
    return pack_codes(np.random.default_rng(seed).integers(0, 2, size=(5, N_BITS)))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    data = SegmentData(np.asarray(SEQS, np.int64), codes(1), codes(2))
    write_segment(out / "segment-v1.seg", n_bits=N_BITS, data=data)
    storage.save(
        out / "index-v1.hidx", n_bits=N_BITS, ids=np.asarray(IDS, np.int64), codes=codes(1)
    )
