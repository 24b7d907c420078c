"""The pairs loader: your own captioned images, one pair a line of DIR/pairs.jsonl or DIR/pairs.csv.

Format (exactly one of the two files; both, or neither, is an InputError):
- pairs.jsonl: one JSON object per line, UTF-8.
- pairs.csv: UTF-8, read by Python's csv module: a header row naming the columns, then one pair
  per record, comma-separated (quote a field holding commas, quotes or newlines; spaces after a
  comma are ignored). `labels` is a `;`-separated list of names; an empty `labels` or `split`
  cell means none given. Every other column is kept as a string.
Fields (names are case-sensitive):
- id (required): a string of 1..256 characters without control characters, other than "." and
  "..", or a non-negative integer (JSON); kept as str(id), so 7 and "7" are the same id. A line
  repeating the id of an earlier line (loaded or not) is rejected.
- image (required): the image file's path relative to DIR. Absolute paths, `..` and symlinks
  resolving outside DIR are rejected; the file must open as an image (PIL).
- text (required): the caption, non-empty after stripping whitespace.
- labels (optional): a list of label names; label_names = their sorted union. They score
  evaluations, and an indexed pair keeps them as its `labels` field, so `cmh train --from-store`
  evaluates with them (models/data/stored.py) and filters can name them.
- split (optional): "train" (training only), "database" (the database, also trained on; the
  default) or "query" (queries only, never trained on). Builds index the database alone.
- any other field: kept per pair in PairDataset.extra, the item's fields once indexed (the
  limits of common/fields.py: at most 16 KB as JSON, nested at most 32 levels).
Protocol: queries = the "query" pairs; database = the "database" pairs; train = the "train" and
"database" pairs. With no split on any loaded line, database = train = every pair, no queries.
Blank lines are skipped; every other line is loaded or rejected with its line number (CSV: the file
line where its record starts; the header is line 1) and the reason.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from common.errors import InputError
from common.fields import fields_json
from models.data.dataset import PairDataset, Rejection

logger = logging.getLogger(__name__)

FILES = ("pairs.jsonl", "pairs.csv")
FIELDS = ("id", "image", "text", "labels", "split")  # the rest of a line goes to `extra`
SPLITS = ("train", "query", "database")
DEFAULT_SPLIT = "database"
MAX_ID_CHARS = 256
EXCERPT_CHARS = 60  # of a line or value quoted in a reason: enough to find it, never megabytes
# What PIL raises for a file that is no readable image (verify() raises SyntaxError too).
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, DecompressionBombError)

# One listed line: (line number, its text, its fields or why it is malformed).
Line = tuple[int, str, dict[str, object] | str]


class _Rejected(Exception):
    """Why one line is not loaded."""


@dataclass(frozen=True)
class _Pair:
    """One loadable line."""

    pair_id: str
    path: Path
    text: str
    labels: list[str]
    split: str | None  # None: the line names no split
    extra: dict[str, object]


def _cut(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


def _show(value: object) -> str:
    """A value as JSON, cut short: how a reason quotes the input."""
    return _cut(json.dumps(value, ensure_ascii=False))


def _listing(root: Path) -> Path:
    """The one pairs file in root."""
    found = [root / name for name in FILES if (root / name).is_file()]
    if len(found) > 1:
        raise InputError(f"expected one of pairs.jsonl and pairs.csv in {str(root)!r}, got both")
    if not found:
        paths = " or ".join(repr(str(root / name)) for name in FILES)
        raise InputError(f"expected {paths}, but neither exists")
    return found[0]


def _jsonl_lines(path: Path) -> Iterator[Line]:
    """The non-blank lines of a JSON Lines file."""
    # Split at "\n" alone: a JSON string may hold U+2028 and the other breaks splitlines() uses.
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            yield number, raw.decode("utf-8", "replace"), f"malformed line: not UTF-8 ({err})"
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:  # also too deep nesting, too long integers
            yield number, line, f"malformed line: invalid JSON ({_cut(str(err))})"
            continue
        if not isinstance(record, dict):
            yield number, line, f"malformed line: expected a JSON object, got {_show(record)}"
            continue
        yield number, line, record


def _csv_lines(path: Path) -> Iterator[Line]:
    """The non-blank records of a CSV file with a header row."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"expected UTF-8 text in {str(path)!r}, got {err}") from err
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(lines, skipinitialspace=True)
    header = [name.strip() for name in next(reader, [])]
    if any(name not in header for name in FIELDS[:3]) or len(set(header)) < len(header):
        raise InputError(
            f"expected a header row naming id, image and text once each in {str(path)!r}, "
            f"got {_show(header)}"
        )
    start = reader.line_num + 1
    while True:
        error = ""
        try:
            row = next(reader, None)
        except csv.Error as err:  # e.g. a field over the csv module's size limit
            row, error = [], f"malformed line: {_cut(str(err))}"
        number, start = start, reader.line_num + 1
        if row is None:
            return
        excerpt = "".join(lines[number - 1 : reader.line_num])
        if error:
            yield number, excerpt, error
        elif len(row) == 0 or (len(row) == 1 and not row[0].strip()):
            continue
        elif len(row) != len(header):
            yield (
                number,
                excerpt,
                f"malformed line: expected {len(header)} comma-separated fields, got {len(row)}",
            )
        else:
            yield number, excerpt, _from_csv(dict(zip(header, row, strict=True)))


def _from_csv(row: dict[str, str]) -> dict[str, object]:
    """A CSV record's fields as a JSON line would give them."""
    record: dict[str, object] = dict(row)
    if "labels" in row:
        record["labels"] = [name.strip() for name in row["labels"].split(";") if name.strip()]
    if row.get("split", "").strip():
        record["split"] = row["split"].strip()
    else:
        record.pop("split", None)
    return record


def _pair_id(record: dict[str, object]) -> str:
    if "id" not in record:
        raise _Rejected("missing id")
    value = record["id"]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise _Rejected(
            f"invalid id: expected a string or a non-negative integer, got {_show(value)}"
        )
    if not 1 <= len(text) <= MAX_ID_CHARS:
        raise _Rejected(f"invalid id: expected 1..{MAX_ID_CHARS} characters, got {len(text)}")
    if text in (".", ".."):  # store.ids.DOT_SEGMENTS: no URL can name such an item
        raise _Rejected(f"invalid id: expected an id other than '.' and '..', got {_show(text)}")
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise _Rejected(f"invalid id: expected no control characters, got {_show(text)}")
    return text


def _image_path(record: dict[str, object], root: Path) -> Path:
    """The resolved image file inside root (already resolved) that the record names."""
    if "image" not in record:
        raise _Rejected("missing image")
    value = record["image"]
    if not isinstance(value, str) or not value:
        raise _Rejected(f"invalid image: expected a path relative to the root, got {_show(value)}")
    relative = Path(value)
    if relative.is_absolute() or ".." in relative.parts:
        raise _Rejected(f"image path escapes the root: {_show(value)}")
    try:
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise _Rejected(f"image path escapes the root: {_show(value)} resolves outside it")
        is_file = path.is_file()
    # A NUL byte or an over-long name (OS errors), a symlink loop (RuntimeError in Python 3.11).
    except (ValueError, OSError, RuntimeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise _Rejected(f"image path rejected by the OS: {_show(value)} ({_cut(why)})") from None
    if not is_file:
        raise _Rejected(f"missing image file: {_show(value)}")
    try:
        with Image.open(path) as im:
            im.verify()
    except IMAGE_ERRORS as err:
        raise _Rejected(f"undecodable image: {_show(value)} ({_cut(str(err))})") from None
    return path


def _check(
    record: dict[str, object] | str, *, root: Path, number: int, first_line: dict[str, int]
) -> _Pair:
    """The pair one line lists; raises _Rejected with the reason when it cannot be loaded."""
    if isinstance(record, str):
        raise _Rejected(record)
    pair_id = _pair_id(record)
    first = first_line.setdefault(pair_id, number)
    if first != number:
        raise _Rejected(f"duplicate id: {_show(pair_id)} first on line {first}")
    if "text" not in record:
        raise _Rejected("missing text")
    text = record["text"]
    if not isinstance(text, str):
        raise _Rejected(f"invalid text: expected a string, got {_show(text)}")
    if not text.strip():
        raise _Rejected("empty text")
    split = record.get("split")
    if "split" in record and split not in SPLITS:
        raise _Rejected(f"unknown split: expected one of {', '.join(SPLITS)}, got {_show(split)}")
    labels = record.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(n, str) and n.strip() for n in labels):
        raise _Rejected(f"invalid labels: expected a list of label names, got {_show(labels)}")
    extra = {k: v for k, v in record.items() if k not in FIELDS}
    if labels:  # kept with the item once indexed (see the module docstring)
        extra["labels"] = [n.strip() for n in labels]
    try:
        fields_json(extra)  # what the store will be asked to hold: refused here, with the line
    except InputError as err:
        raise _Rejected(f"invalid fields: {err}") from None
    return _Pair(
        pair_id=pair_id,
        path=_image_path(record, root),
        text=text.strip(),
        labels=[n.strip() for n in labels],
        split=str(split) if split is not None else None,
        extra=extra,
    )


def load_pairs(root: Path) -> PairDataset:
    """Load root/pairs.jsonl or root/pairs.csv (format in the module docstring)."""
    path = _listing(root)
    base = root.resolve()
    pairs: list[_Pair] = []
    rejected: list[Rejection] = []
    first_line: dict[str, int] = {}
    listed = 0
    for number, line, record in _jsonl_lines(path) if path.suffix == ".jsonl" else _csv_lines(path):
        listed += 1
        try:
            pairs.append(_check(record, root=base, number=number, first_line=first_line))
        except _Rejected as err:
            rejected.append(Rejection(f"line {number}: {_cut(line.strip())!r}", str(err)))
    first = f"; first: {rejected[0].pair}: {rejected[0].reason}" if rejected else ""
    if not pairs:
        raise InputError(
            f"expected at least one loadable pair in {str(path)!r}, got none of {listed} "
            f"listed lines ({len(rejected)} rejected{first})"
        )
    if rejected:
        logger.warning("pairs: rejected %d of %d lines%s", len(rejected), listed, first)
    splits = np.asarray([p.split or DEFAULT_SPLIT for p in pairs])
    train_idx = np.flatnonzero(splits != "query").astype(np.int64)
    query_idx = np.flatnonzero(splits == "query").astype(np.int64)
    database_idx = np.flatnonzero(splits == "database").astype(np.int64)
    label_names = sorted({n for p in pairs for n in p.labels})
    column = {n: j for j, n in enumerate(label_names)}
    labels = np.zeros((len(pairs), len(label_names)), dtype=np.uint8)  # (N, C)
    for i, p in enumerate(pairs):
        labels[i, [column[n] for n in p.labels]] = 1
    if any(p.split is not None for p in pairs):
        protocol = (
            f"by each line's split: {query_idx.size} queries; database = the {database_idx.size} "
            f"database pairs; train = database + {train_idx.size - database_idx.size} train pairs"
        )
    else:
        protocol = 'no split given: database = train = every pair; no queries (split "query")'
    return PairDataset(
        name="pairs",
        ids=[p.pair_id for p in pairs],
        labels=labels,
        train_idx=train_idx,
        query_idx=query_idx,
        database_idx=database_idx,
        indexed_idx=database_idx,  # "query" and "train" lines are never searched
        label_names=label_names,
        image_paths=[p.path for p in pairs],
        texts=[p.text for p in pairs],
        extra=[p.extra for p in pairs],
        listed=listed,
        rejected=rejected,
        protocol=protocol,
    )
