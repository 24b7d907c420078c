"""One text to its packed code: the fast path (models/network/text_path.py) against the torch path.

    .venv/bin/python -m bench.text_path --checkpoint artifacts/model.pt

The torch path is what encode_texts did before: scikit-learn's CountVectorizer on the same
tokenizer, a dense float32 row, `HashingModel.encode_text`. Both encode the same texts (demo-like
captions, or the lines of --texts), one text per call, in alternated rounds; the codes are
checked equal first. Prints the medians (microseconds per text) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer

from bench.writes import caption_pool
from indexes.codes import pack_codes
from models.features.text import TextVectorizer, tokenize
from models.network.checkpoint import load_checkpoint
from models.network.text_path import TextPath


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("artifacts/model.pt"))
    parser.add_argument("--texts", type=Path, help="one query per line (default: demo captions)")
    parser.add_argument("--rounds", type=int, default=7, help="alternated rounds (default 7)")
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.checkpoint)
    assert checkpoint.vocabulary is not None, "expected a bag-of-words checkpoint"
    model, vocabulary = checkpoint.model, checkpoint.vocabulary
    path = TextPath.from_model(model)
    assert path is not None, "the fast path refused this model (see the log)"
    vectorizer = TextVectorizer(vocabulary)
    sklearn = CountVectorizer(
        analyzer=lambda t: tokenize(t, "auto"), vocabulary=vocabulary, binary=True
    )
    if args.texts is not None:
        texts = args.texts.read_text(encoding="utf-8").splitlines()
    else:
        texts = caption_pool()[:64].tolist()

    def torch_path(text: str) -> np.ndarray:
        dense = sklearn.transform([text]).toarray().astype(np.float32)
        return pack_codes(model.encode_text(dense))

    def fast_path(text: str) -> np.ndarray:
        return pack_codes(path.encode(vectorizer.columns([text])))

    for text in texts:
        assert np.array_equal(torch_path(text), fast_path(text)), text
    paths: dict[str, Callable[[str], np.ndarray]] = {"torch": torch_path, "fast": fast_path}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(args.rounds):
        for name in list(paths)[:: 1 if r % 2 == 0 else -1]:
            start = time.perf_counter()
            for text in texts:
                paths[name](text)
            seconds[name].append((time.perf_counter() - start) / len(texts))
    torch_us, fast_us = (statistics.median(seconds[n]) * 1e6 for n in ("torch", "fast"))
    result = {"texts": len(texts), "torch_us": torch_us, "fast_us": fast_us}
    print(json.dumps(result | {"ratio": torch_us / fast_us}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
