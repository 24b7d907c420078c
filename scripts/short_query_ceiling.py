"""How far W random words of a caption can name its category at all: a label-using reference.

Short-query MAP (`cmh evaluate --query-words`) is bounded by what the drawn words say. This
reference is given what no unsupervised model has: a multinomial naive Bayes classifier fitted on
the training captions WITH their category labels, and the database items' true categories. Each
W-word query ranks the database by the posterior of each item's own category given the words
(ties by the item's order), so its MAP@all is what a perfect image side with a good supervised
word model would reach. Same queries, words and weighting as `cmh evaluate --query-words`
(binary words, the dataset's vocabulary); `--on validation` as there.

`--image-side probe` replaces the true categories of the database items with what their photos
say: a logistic regression on the image features, fitted with the categories of the other
items (5-fold, so no item's own label scores it), gives each item a category distribution, and
an item is scored by the probability that it shares the query's category (the dot product of the
two distributions). That is what a supervised image side on these features would reach; an
unsupervised one should expect less. `--image-side pair` gives each item what a supervised model
could say from its photo and its caption, both of which an unsupervised model trains on for the
database's items: the photo's probe distribution above times the caption's naive Bayes posterior
(also 5-fold), divided by the category prior and renormalised.

    .venv/bin/python -m scripts.short_query_ceiling --root ../shared/data/web-news \
        --on validation --json docs/results/short-query-ceiling.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.model_selection import cross_val_predict
from sklearn.naive_bayes import MultinomialNB
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.fsio import atomic_write_bytes
from evaluation.metrics import average_precisions, relevance
from models.features.pipeline import prepare
from models.methods.compare import on_validation, short_queries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="Web News folder")
    parser.add_argument("--on", choices=("queries", "validation"), default="validation")
    parser.add_argument("--words", default="1,2,3")
    parser.add_argument("--image-side", choices=("truth", "probe", "pair"), default="truth")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = prepare("web-news", args.root)
    if args.on == "validation":
        data = on_validation(data)
    assert data.text_features is not None and data.image_features is not None
    classes = data.labels.argmax(axis=1)
    nb = MultinomialNB().fit(data.text_features[data.train_idx], classes[data.train_idx])
    db = data.database_idx
    if args.image_side == "truth":
        item_classes = np.eye(data.labels.shape[1])[classes[db]]
    else:
        # Its regularisation chosen by 3-fold validation inside each fold's training part.
        regression = LogisticRegressionCV(Cs=(0.001, 0.01, 0.1, 1.0), cv=3, max_iter=3000)
        probe = make_pipeline(StandardScaler(), regression)
        item_classes = cross_val_predict(
            probe, data.image_features[db], classes[db], cv=5, method="predict_proba"
        )
        if args.image_side == "pair":
            words = cross_val_predict(
                MultinomialNB(), data.text_features[db], classes[db], cv=5, method="predict_proba"
            )
            prior = np.bincount(classes[db], minlength=item_classes.shape[1]) / db.size
            item_classes = item_classes * words / np.maximum(prior, 1e-12)
            item_classes /= item_classes.sum(axis=1, keepdims=True)
    out: dict[str, float] = {}
    for n_words in (int(w) for w in args.words.split(",")):
        features, rows = short_queries(data, n_words)
        posterior = nb.predict_proba(features)  # (n_query, n_classes)
        dists = -posterior @ item_classes.T  # the chance that each item shares the category
        rel = relevance(data.labels[rows], data.labels[db])
        out[str(n_words)] = float(np.mean(average_precisions(dists, rel, seed=0)))
    document = {
        "on": args.on,
        "image_side": args.image_side,
        "protocol": data.protocol,
        "t2i_map_all_by_words": out,
    }
    print(json.dumps(document, ensure_ascii=False))
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(document, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
