"""How far W random words of a caption can name its category at all: a label-using reference.

Short-query MAP (`cmh evaluate --query-words`) is bounded by what the drawn words say. This
reference is given what no unsupervised model has: a multinomial naive Bayes classifier fitted on
the training captions WITH their category labels, and the database items' true categories. Each
W-word query ranks the database by the posterior of each item's own category given the words
(ties by the item's order), so its MAP@all is what a perfect image side with a good supervised
word model would reach. Same queries, words and weighting as `cmh evaluate --query-words`
(binary words, the dataset's vocabulary); `--on validation` as there.

    .venv/bin/python -m scripts.short_query_ceiling --root ../shared/data/web-news \
        --on validation --json docs/results/short-query-ceiling.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.naive_bayes import MultinomialNB

from common.fsio import atomic_write_bytes
from evaluation.metrics import average_precisions, relevance
from models.features.pipeline import prepare
from models.methods.compare import on_validation, short_queries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="Web News folder")
    parser.add_argument("--on", choices=("queries", "validation"), default="validation")
    parser.add_argument("--words", default="1,2,3")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = prepare("web-news", args.root)
    if args.on == "validation":
        data = on_validation(data)
    assert data.text_features is not None
    classes = data.labels.argmax(axis=1)
    nb = MultinomialNB().fit(data.text_features[data.train_idx], classes[data.train_idx])
    db = data.database_idx
    out: dict[str, float] = {}
    for n_words in (int(w) for w in args.words.split(",")):
        features, rows = short_queries(data, n_words)
        posterior = nb.predict_proba(features)  # (n_query, n_classes)
        dists = -posterior[:, classes[db]]  # each item scored by its own category's posterior
        rel = relevance(data.labels[rows], data.labels[db])
        out[str(n_words)] = float(np.mean(average_precisions(dists, rel, seed=0)))
    document = {"on": args.on, "protocol": data.protocol, "t2i_map_all_by_words": out}
    print(json.dumps(document, ensure_ascii=False))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(document, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
