"""Dataset loaders: Wikipedia (.mat features), Web News (raw folders), the paper's feature files,
and your own pairs (a JSON Lines or CSV file of image paths and captions).

Every loader returns a `PairDataset`. Protocols (queries never overlap the database; unsupervised
methods train on the database):
- wikipedia: with I_te/T_te present, queries = the test pairs and database = train = the
  training pairs; without them, a seeded 20% of the training part are queries and the rest is
  database = train.
- web-news: queries = the pairs of testset_txt_img_cat.list; database = train = trainset's pairs.
- mirflickr25k, iapr-tc12, nus-wide: 2,000 (NUS-WIDE 2,100) seeded random queries; database = train
  = the rest (the UCCH code's file layout, documented in the README).
- demo: the generated dataset (models/data/demo.py).
- pairs: each line's split field (models/data/pairs.py): queries = the "query" pairs; database = the
  "database" pairs (the default); train = the "train" and "database" pairs. With no split on any
  line, database = train = every pair and there are no queries.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io

from common.errors import InputError
from models.data.dataset import PairDataset, Rejection, seeded_query_split
from models.data.demo import load_demo
from models.data.matfiles import read_mat_variables
from models.data.pairs import load_pairs
from models.data.webnews import load_web_news

logger = logging.getLogger(__name__)

DATASETS = ("wikipedia", "web-news", "demo", "mirflickr25k", "iapr-tc12", "nus-wide", "pairs")

# The feature-file layout of the UCCH code (Hu et al., TPAMI 2023; the AUCMH authors' group):
# dataset -> (folder, {variable: file}) and the number of seeded random queries.
PAPER_LAYOUTS: dict[str, tuple[str, dict[str, str], int]] = {
    "mirflickr25k": (
        "MIRFLICKR25K",
        {
            "XAll": "mirflickr25k-iall-vgg.mat",
            "YAll": "mirflickr25k-yall.mat",
            "LAll": "mirflickr25k-lall.mat",
        },
        2000,
    ),
    "nus-wide": (
        "NUS-WIDE-TC10",
        {
            "XAll": "nus-wide-tc10-xall-vgg.mat",
            "YAll": "nus-wide-tc10-yall.mat",
            "LAll": "nus-wide-tc10-lall.mat",
        },
        2100,
    ),
}
IAPR_FILE = ("IAPR-TC12", "iapr-tc12-rand.mat", 2000)
WIKIPEDIA_DEV_QUERY_FRACTION = 0.2


# The datasets with raw captions; the others ship text features, which cannot be reweighted or cut.
RAW_TEXT_DATASETS = ("web-news", "demo", "pairs")


def load_dataset(name: str, root: Path, *, seed: int = 0) -> PairDataset:
    """Load dataset `name` from `root`; raises InputError for an unknown name or a bad root."""
    if name not in DATASETS:
        raise InputError(f"expected a dataset in {', '.join(DATASETS)}, got {name!r}")
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"expected {name} root to be a directory, got {str(root)!r}")
    if name == "wikipedia":
        return load_wikipedia(root, seed=seed)
    if name == "web-news":
        return load_web_news(root)
    if name == "demo":
        return load_demo(root)
    if name == "pairs":
        return load_pairs(root)
    if name == "iapr-tc12":
        return load_iapr(root, seed=seed)
    return load_paper_features(name, root, seed=seed)


def read_list(path: Path) -> list[str]:
    """The lines of a `*_txt_img_cat.list` or `categories.list` file (UTF-8)."""
    if not path.is_file():
        raise InputError(f"expected list file {str(path)!r}, but it does not exist")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise InputError(f"expected UTF-8 text in {str(path)!r}, got {err}") from err


def parse_pair_line(line: str, n_classes: int) -> tuple[str, str, int]:
    """Split `text_id<TAB>image_id<TAB>category`; raises InputError when malformed."""
    fields = line.split("\t")
    if len(fields) != 3:
        raise InputError(f"expected 3 tab-separated fields, got {len(fields)}")
    text_id, image_id, cat = (f.strip() for f in fields)
    if not text_id or not image_id:
        raise InputError("expected a text id and an image id, got an empty field")
    try:
        label = int(cat)
    except ValueError:
        raise InputError(f"expected an integer category, got {cat!r}") from None
    if not 1 <= label <= n_classes:
        raise InputError(f"expected a category in 1..{n_classes}, got {label}")
    return text_id, image_id, label


def one_hot(labels: list[int], n_classes: int) -> np.ndarray:
    """(N,) 1-based class numbers -> (N, n_classes) uint8 multi-hot."""
    out = np.zeros((len(labels), n_classes), dtype=np.uint8)
    out[np.arange(len(labels)), np.asarray(labels, dtype=np.int64) - 1] = 1
    return out


def load_wikipedia(root: Path, *, seed: int = 0) -> PairDataset:
    """The Wikipedia benchmark from raw_features.mat and its list files (see module docstring)."""
    mat_path = root / "raw_features.mat"
    if not mat_path.is_file():
        raise InputError(f"expected {str(mat_path)!r} (Wikipedia features), but it does not exist")
    try:
        mat = scipy.io.loadmat(mat_path)
    except (ValueError, OSError) as err:
        raise InputError(f"expected a MATLAB file at {str(mat_path)!r}, got: {err}") from err
    label_names = [n for n in read_list(root / "categories.list") if n.strip()]
    parts: list[tuple[str, str, str]] = [("I_tr", "T_tr", "trainset_txt_img_cat.list")]
    has_test = "I_te" in mat and "T_te" in mat
    if has_test:
        parts.append(("I_te", "T_te", "testset_txt_img_cat.list"))
    images, texts, ids, labels = [], [], [], []
    for image_var, text_var, list_name in parts:
        if image_var not in mat or text_var not in mat:
            raise InputError(f"expected variables {image_var} and {text_var} in {str(mat_path)!r}")
        img, txt = np.asarray(mat[image_var]), np.asarray(mat[text_var])
        lines = [ln for ln in read_list(root / list_name) if ln.strip()]
        if not img.shape[0] == txt.shape[0] == len(lines):
            raise InputError(
                f"expected {image_var}, {text_var} and {list_name} to have equal rows, got "
                f"{img.shape[0]}, {txt.shape[0]} and {len(lines)}"
            )
        for number, line in enumerate(lines, start=1):
            try:
                text_id, _, label = parse_pair_line(line, len(label_names))
            except InputError as err:
                raise InputError(f"{list_name} line {number}: {err}") from None
            ids.append(text_id)
            labels.append(label)
        images.append(img)
        texts.append(txt)
    n_train = images[0].shape[0]
    n = sum(i.shape[0] for i in images)
    if has_test:
        query_idx = np.arange(n_train, n, dtype=np.int64)
        train_idx = np.arange(n_train, dtype=np.int64)
        protocol = "queries = the test pairs; database = train = the training pairs"
    else:
        n_query = round(WIKIPEDIA_DEV_QUERY_FRACTION * n_train)
        query_idx, train_idx = seeded_query_split(n_train, n_query=n_query, seed=seed)
        protocol = (
            f"development split (no test variables): {n_query} seeded queries (seed {seed}) "
            "from the training part; database = train = the rest"
        )
    return PairDataset(
        name="wikipedia",
        ids=ids,
        labels=one_hot(labels, len(label_names)),
        train_idx=train_idx,
        query_idx=query_idx,
        database_idx=train_idx,
        label_names=label_names,
        image_features=np.concatenate(images).astype(np.float32),
        text_features=np.concatenate(texts).astype(np.float32),
        listed=n,
        protocol=protocol,
        image_backbone="sift-bovw-128",
    )


def _random_query_protocol(n: int, n_query: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(query_idx, database_idx, protocol line) for the paper datasets' seeded query split."""
    if n <= n_query:
        raise InputError(f"expected more than {n_query} pairs, got {n}")
    query_idx, db_idx = seeded_query_split(n, n_query=n_query, seed=seed)
    return (
        query_idx,
        db_idx,
        f"{n_query} seeded random queries (seed {seed}); database = train = rest",
    )


def _paper_dataset(
    name: str, image: np.ndarray, text: np.ndarray, labels: np.ndarray, n_query: int, seed: int
) -> PairDataset:
    """A PairDataset over feature matrices with the paper's random-query protocol."""
    if not image.shape[0] == text.shape[0] == labels.shape[0]:
        raise InputError(
            f"expected equal rows in image, text and label matrices, got "
            f"{image.shape[0]}, {text.shape[0]} and {labels.shape[0]}"
        )
    query_idx, db_idx, protocol = _random_query_protocol(image.shape[0], n_query, seed)
    binary = (labels > 0).astype(np.uint8)
    return PairDataset(
        name=name,
        ids=[str(i) for i in range(image.shape[0])],
        labels=binary,
        train_idx=db_idx,
        query_idx=query_idx,
        database_idx=db_idx,
        label_names=[f"label_{j + 1}" for j in range(binary.shape[1])],
        image_features=image.astype(np.float32),
        text_features=text.astype(np.float32),
        listed=image.shape[0],
        protocol=protocol,
        image_backbone="vgg19-fc7",
    )


def load_paper_features(name: str, root: Path, *, seed: int = 0) -> PairDataset:
    """MIRFLICKR-25K or NUS-WIDE in the UCCH layout: XAll (images), YAll (BoW), LAll (labels)."""
    folder, files, n_query = PAPER_LAYOUTS[name]
    base = root / folder if (root / folder).is_dir() else root
    arrays: dict[str, np.ndarray] = {}
    for var, filename in files.items():
        arrays.update(read_mat_variables(base / filename, [var]))
    return _paper_dataset(name, arrays["XAll"], arrays["YAll"], arrays["LAll"], n_query, seed)


def load_iapr(root: Path, *, seed: int = 0) -> PairDataset:
    """IAPR TC-12 in the UCCH layout: one file with database and test parts, pooled then split."""
    folder, filename, n_query = IAPR_FILE
    base = root / folder if (root / folder).is_dir() else root
    names = ["VDatabase", "YDatabase", "databaseL", "VTest", "YTest", "testL"]
    v = read_mat_variables(base / filename, names)
    image = np.concatenate([v["VDatabase"], v["VTest"]])
    text = np.concatenate([v["YDatabase"], v["YTest"]])
    labels = np.concatenate([v["databaseL"], v["testL"]])
    return _paper_dataset("iapr-tc12", image, text, labels, n_query, seed)


def summarize(data: PairDataset) -> dict[str, object]:
    """The counts `cmh data check` prints: listed, loaded, rejected with reasons, splits, labels."""
    reasons: dict[str, int] = defaultdict(int)
    for r in data.rejected:
        reasons[r.reason.split(":")[0]] += 1
    return {
        "dataset": data.name,
        "listed": data.listed,
        "loaded": len(data),
        "rejected": len(data.rejected),
        "rejections": [_as_dict(r) for r in data.rejected],
        "rejection_kinds": dict(reasons),
        "defects_loaded_anyway": [_as_dict(r) for r in data.defects],
        "splits": data.split_sizes(),
        "n_labels": int(data.labels.shape[1]),
        "label_names": data.label_names,
        "protocol": data.protocol,
        "image": _modality(data.image_features, data.image_paths, "image files"),
        "text": _modality(data.text_features, data.texts, "raw texts"),
    }


def _as_dict(r: Rejection) -> dict[str, str]:
    return {"pair": r.pair, "reason": r.reason}


def _modality(features: np.ndarray | None, raw: Sequence[object] | None, raw_kind: str) -> str:
    if features is not None:
        return f"features {features.shape[1]}-d"
    return f"{len(raw or [])} {raw_kind}"
