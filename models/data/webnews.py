"""The Web News loader: raw image folders and Chinese captions, with every defect accounted for.

Layout: images/<category>/<image_id>.jpg, texts/<text_id>.txt, categories.list, and
trainset_txt_img_cat.list / testset_txt_img_cat.list (text id, image id, category 1..N).
Every listed pair ends up loaded (possibly with a recorded defect) or rejected with a reason.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import InputError
from models.data.dataset import PairDataset, Rejection

logger = logging.getLogger(__name__)

LISTS = (("train", "trainset_txt_img_cat.list"), ("query", "testset_txt_img_cat.list"))


def _index_images(images_dir: Path) -> dict[str, list[Path]]:
    """Every image file under images/, keyed by its stem with surrounding whitespace removed."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(images_dir.glob("*/*")):
        if path.is_file():
            found[path.stem.strip()].append(path)
    return found


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resolve_image(
    image_id: str, category: str, images_dir: Path, index: dict[str, list[Path]]
) -> tuple[Path | None, list[str]]:
    """(path or None, defects): the listed image, or the one file it must mean."""
    listed = images_dir / category / f"{image_id}.jpg"
    candidates = index.get(image_id, [])
    defects: list[str] = []
    if listed.is_file():
        path = listed
    else:
        in_category = [p for p in candidates if p.parent.name == category]
        pool = in_category or candidates
        if len(pool) != 1:
            return None, []
        path = pool[0]
        defects.append(
            f"listed as {category}/{image_id}.jpg, found as {path.parent.name}/{path.name!r}"
        )
    twins = [p for p in candidates if p != path]
    for twin in twins:
        same = "identical content" if _digest(twin) == _digest(path) else "different content"
        defects.append(f"image also appears as {twin.parent.name}/{twin.name} ({same})")
    return path, defects


def _inspect_image(path: Path) -> tuple[str | None, list[str]]:
    """(error or None, defects): reads the header only, so a full decode is left to features."""
    try:
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return f"could not decode image {path.name}: {err}", []
    defects = []
    if fmt != "JPEG":
        defects.append(f"{path.name} is {fmt}, not JPEG as its name says")
    if mode != "RGB":
        defects.append(f"colour mode {mode}, converted to RGB when read")
    return None, defects


def _read_text(path: Path) -> tuple[str | None, str | None]:
    """(text, None) or (None, reason)."""
    if not path.is_file():
        return None, f"text file not found: texts/{path.name}"
    try:
        text = path.read_bytes().decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError as err:
        return None, f"text file texts/{path.name} is not UTF-8: {err}"
    if not text:
        return None, f"text file texts/{path.name} is empty"
    return text, None


def load_web_news(root: Path) -> PairDataset:
    """Load Web News; queries = the test list, database = train = the train list."""
    images_dir, texts_dir = root / "images", root / "texts"
    for needed in (images_dir, texts_dir, root / "categories.list"):
        if not needed.exists():
            raise InputError(f"expected {str(needed)!r} in the Web News root, but it is missing")
    label_names = [
        n.strip() for n in (root / "categories.list").read_text("utf-8").splitlines() if n.strip()
    ]
    index = _index_images(images_dir)
    ids: list[str] = []
    paths: list[Path] = []
    texts: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    rejected: list[Rejection] = []
    defects: list[Rejection] = []
    seen: dict[tuple[str, str], str] = {}
    listed = 0
    for split, list_name in LISTS:
        list_path = root / list_name
        if not list_path.is_file():
            raise InputError(f"expected {str(list_path)!r} in the Web News root, but it is missing")
        for number, line in enumerate(list_path.read_text("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            listed += 1
            where = f"{list_name} line {number}: {line.strip()!r}"
            reason, record = _load_pair(line, label_names, images_dir, texts_dir, index)
            if record is None:
                rejected.append(Rejection(where, reason))
                continue
            text_id, image_id, label, path, text, pair_defects = record
            key = (text_id, image_id)
            if key in seen:
                rejected.append(Rejection(where, f"duplicate: pair already listed at {seen[key]}"))
                continue
            seen[key] = f"{list_name} line {number}"
            defects.extend(Rejection(where, d) for d in pair_defects)
            ids.append(text_id)
            paths.append(path)
            texts.append(text)
            labels.append(label)
            splits.append(split)
    for r in rejected:
        logger.warning("web-news rejected %s: %s", r.pair, r.reason)
    split_arr = np.asarray(splits)
    train_idx = np.flatnonzero(split_arr == "train").astype(np.int64)
    query_idx = np.flatnonzero(split_arr == "query").astype(np.int64)
    label_matrix = np.zeros((len(ids), len(label_names)), dtype=np.uint8)
    label_matrix[np.arange(len(ids)), np.asarray(labels, dtype=np.int64) - 1] = 1
    return PairDataset(
        name="web-news",
        ids=ids,
        labels=label_matrix,
        train_idx=train_idx,
        query_idx=query_idx,
        database_idx=train_idx,
        label_names=label_names,
        image_paths=paths,
        texts=texts,
        listed=listed,
        rejected=rejected,
        defects=defects,
        protocol="queries = testset list; database = train = trainset list",
    )


def _load_pair(
    line: str,
    label_names: list[str],
    images_dir: Path,
    texts_dir: Path,
    index: dict[str, list[Path]],
) -> tuple[str, tuple[str, str, int, Path, str, list[str]] | None]:
    """(reason, None) when rejected, else ("", (text_id, image_id, label, path, text, defects))."""
    fields = line.split("\t")
    if len(fields) != 3:
        return f"malformed line: expected 3 tab-separated fields, got {len(fields)}", None
    text_id, image_id, cat = (f.strip() for f in fields)
    if not (text_id and image_id and cat.isdigit() and 1 <= int(cat) <= len(label_names)):
        return f"malformed line: expected ids and a category in 1..{len(label_names)}", None
    label = int(cat)
    category = label_names[label - 1]
    path, defects = _resolve_image(image_id, category, images_dir, index)
    if path is None:
        return f"image not found: images/{category}/{image_id}.jpg (no file with that id)", None
    error, image_defects = _inspect_image(path)
    if error is not None:
        return error, None
    text, text_error = _read_text(texts_dir / f"{text_id}.txt")
    if text is None:
        return text_error or "unreadable text", None
    return "", (text_id, image_id, label, path, text, defects + image_defects)
