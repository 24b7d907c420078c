"""A batch of new items and its rows in the items table: checked, inserted, deleted.

Everything here is decided before (checks) or inside (SQL) the writer's transaction, but holds
no state: the Store owns the lock, the transaction and the in-memory parts, and calls these to
turn a user's batch into rows. A batch is checked whole before any lock is taken, so a refusal
costs no write and names what was wrong; plain batches (integer ids, ASCII texts) are checked at
C speed, since ingest throughput rests on it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import sqlite3
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from common.errors import InputError
from common.fields import fields_json
from common.fsio import atomic_write, atomic_write_bytes, fsync_dir
from indexes.codes import check_packed
from store import metadata as md
from store.filters import checked_terms, terms_of_json
from store.ids import MAX_INT_ID, ItemId, parse_id

IMAGES_DIR = "images"  # under the artifacts folder: images the store keeps, content-addressed
_EXTENSION = re.compile(r"[a-z0-9]{1,5}")  # of stored image files
# A kept image's name: the SHA-256 of its bytes and its extension (what checked_rows writes).
KEPT_IMAGE = re.compile(rf"{IMAGES_DIR}/([0-9a-f]{{64}})\.([a-z0-9]{{1,5}})")


@dataclass(frozen=True)
class NewItems:
    """A batch to add, column by column (rows aligned)."""

    ids: Sequence[ItemId]  # canonical ids (store.ids.parse_id)
    texts: Sequence[str]
    images: Sequence[str]  # paths relative to the artifacts folder
    image_codes: np.ndarray  # (b, n_words) uint64
    text_codes: np.ndarray  # (b, n_words) uint64
    fields: Sequence[dict[str, Any]] | None = None  # the user's fields per item
    # (bytes, extension) of images for the store to keep under images/ (content-addressed);
    # where given, it replaces that row's entry in `images`
    image_data: Sequence[tuple[bytes, str] | None] | None = None
    # Kept image files of another store (named images/<sha256>.<ext>) to hard-link (or copy)
    # under images/; where given, it replaces that row's entry in `images` (a reindex's copy).
    image_files: Sequence[Path | None] | None = None
    # When each item was added (seconds since the epoch); None: now. A reindex keeps the times.
    added: Sequence[float] | None = None

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Rows:
    """A checked batch, column by column, as SQLite will store it."""

    ids: list[ItemId]
    texts: list[str]
    images: list[str]
    fields: list[str]  # JSON objects
    terms: list[tuple[int, list[str]]]  # (row, its fields' terms) of the rows with fields
    image_codes: np.ndarray  # (b, words) uint64, checked
    text_codes: np.ndarray
    added: list[float] | None  # per row; None: the time of the commit


# What an image file of the store is made from: its bytes, or another store's file with them.
ImageSource = bytes | Path


def checked_rows(batch: NewItems, n_bits: int) -> tuple[Rows, dict[str, ImageSource]]:
    """(id, text, image, fields JSON, codes bytes) per item, checked before any lock, and
    the image files to write (path relative to artifacts -> bytes, or a file to link)."""
    b = len(batch)
    for name, codes in (("image", batch.image_codes), ("text", batch.text_codes)):
        check_packed(codes, n_bits, name=f"{name} codes")
        if codes.shape[0] != b:
            raise InputError(f"expected {b} {name} codes, got {codes.shape[0]}")
    if len(batch.texts) != b or len(batch.images) != b:
        raise InputError(
            f"expected {b} texts and images, got {len(batch.texts)}, {len(batch.images)}"
        )
    fields = batch.fields if batch.fields is not None else [{}] * b
    image_data = batch.image_data if batch.image_data is not None else [None] * b
    if len(fields) != b or len(image_data) != b:
        raise InputError(f"expected {b} field objects and images, got {len(fields)}")
    images = list(batch.images)
    to_write: dict[str, ImageSource] = {}
    for i, given in enumerate(image_data):
        if given is not None:
            data, extension = given
            if not _EXTENSION.fullmatch(extension):
                raise InputError(f"expected an image extension like 'jpg', got {extension!r}")
            images[i] = f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()}.{extension}"
            to_write[images[i]] = data
    for i, file in enumerate(batch.image_files or []):
        if file is not None:
            images[i] = f"{IMAGES_DIR}/{file.name}"
            if not KEPT_IMAGE.fullmatch(images[i]):
                raise InputError(f"expected a kept image file named <sha256>.<ext>, got {file}")
            to_write[images[i]] = file
    added = None if batch.added is None else [float(t) for t in batch.added]
    if added is not None and len(added) != b:
        raise InputError(f"expected {b} added times, got {len(added)}")
    rows = Rows(
        ids=_checked_ids(batch.ids),
        texts=_checked_texts(batch.texts, "texts"),
        images=_checked_texts(images, "images"),
        fields=["{}"] * b if batch.fields is None else [fields_json(f) for f in fields],
        terms=[]
        if batch.fields is None
        else [(i, checked_terms(f)) for i, f in enumerate(fields) if f],
        image_codes=batch.image_codes,
        text_codes=batch.text_codes,
        added=added,
    )
    return rows, to_write


def put_image(path: Path, source: ImageSource, *, durable: bool = True) -> None:
    """Write an image file of the store: its bytes (atomically and durably), or a hard link to
    another store's file with them (the same content-addressed name, no second copy on disk;
    copied where the two folders are on different file systems). `durable=False`: the caller
    fsyncs the folder once for a batch of links (store.Store.add)."""
    if isinstance(source, bytes):
        atomic_write_bytes(path, source)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, path)
    except FileExistsError:
        return
    except OSError:  # another file system, or links not supported: a copy
        with source.open("rb") as f:
            atomic_write(path, lambda out: shutil.copyfileobj(f, out))
        return
    if durable:
        fsync_dir(path.parent)


def insert_rows(
    conn: sqlite3.Connection, rows: Rows, seqs: list[int], added: float, *, codes: bool
) -> None:
    """Insert the rows and their terms in the open transaction; InputError on a taken id.

    Without `codes` the code columns are NULL (see _with_seqs). On a clash the rows inserted
    before it are rolled back to a savepoint, and the caller's transaction is left open.
    """
    conn.execute("SAVEPOINT batch")
    try:
        conn.executemany(
            "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _with_seqs(rows, seqs, added, codes=codes),
        )
    except sqlite3.IntegrityError:
        conn.execute("ROLLBACK TO batch")  # the batch's rows inserted before the clash
        taken = md.existing_ids(conn, rows.ids)
        repeated = _first_repeat(rows.ids)
        raise InputError(
            f"expected new ids, got {sorted(map(str, taken))[:10]} already indexed"
            if taken
            else f"expected unique ids, got id {repeated!r} twice in this batch"
        ) from None
    # in (term, seq) order: each term's new rows go to one place in its B-tree
    md.insert_terms(conn, sorted((t, seqs[i]) for i, ts in rows.terms for t in ts))


def delete_rows(
    conn: sqlite3.Connection, ids: list[ItemId], *, sealed_up_to: int
) -> list[tuple[int, str, ItemId]]:
    """Delete the rows of ids (and their terms) in the open transaction, tombstoning those
    in segments (seq <= sealed_up_to).

    Returns (seq, image, id) of each row that was there.
    """
    gone: list[tuple[int, str, ItemId]] = []
    terms: list[tuple[str, int]] = []
    for part in md.chunks([parse_id(i) for i in ids]):
        sql = (
            f"DELETE FROM items WHERE id IN ({md.marks(len(part))}) "
            "RETURNING seq, image, id, fields"
        )
        for seq, image, item_id, fields in conn.execute(sql, tuple(part)).fetchall():
            gone.append((int(seq), str(image), item_id))
            if fields != "{}":
                terms.extend((t, int(seq)) for t in terms_of_json(fields))
    md.delete_terms(conn, terms)
    conn.executemany(
        "INSERT INTO tombstones VALUES (?)", [(g[0],) for g in gone if g[0] <= sealed_up_to]
    )
    return gone


def codes_from_bytes(blob: bytes, words: int) -> np.ndarray:
    """(n, words) uint64 codes from their little-endian bytes, back to back."""
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64).reshape(-1, words)


def _code_bytes(codes: np.ndarray) -> list[bytes]:
    """Each row's code as its little-endian bytes."""
    data = np.ascontiguousarray(codes, dtype="<u8")
    width = 8 * data.shape[1]
    blob = data.tobytes()
    return [blob[i : i + width] for i in range(0, len(blob), width)]


def _checked_ids(ids: Sequence[ItemId]) -> list[ItemId]:
    """Canonical ids; a batch of plain integers in range is checked at C speed."""
    if set(map(type, ids)) <= {int}:  # C speed, unlike a generator over the batch
        ints = cast(list[int], list(ids))
        if not ints or (min(ints) >= 0 and max(ints) <= MAX_INT_ID):
            return list(ints)
    return [parse_id(i) for i in ids]


def _checked_texts(values: Sequence[object], what: str) -> list[str]:
    """Strings SQLite can store (UTF-8, so no lone surrogates), or InputError."""
    if set(map(type, values)) <= {str}:
        texts = cast(list[str], list(values))
        joined = "".join(texts)
        if joined.isascii() and "\0" not in joined:  # the common case, at C speed
            return texts
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise InputError(f"expected {what} as strings, got {type(value).__name__} at {index}")
        if "\0" in value:  # the row checksum joins values with NUL
            raise InputError(f"expected {what} without NUL characters, got one at {index}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InputError(
                f"expected {what} of valid Unicode, got a lone surrogate at {index}:{err.start}"
            ) from None
    return cast(list[str], list(values))


def _with_seqs(rows: Rows, seqs: list[int], added: float, *, codes: bool) -> Any:
    """The rows as SQLite tuples, each with its seq, added time and CRC.

    Without `codes` (a bulk batch, whose codes are in its own checksummed segment file) the
    code columns are NULL: the rows are smaller and insert faster, and the CRC is md.row_crc's
    without codes written out inline (one f-string per row: this is most of a bulk ingest's
    Python time), which tests check against md.row_crc.
    """
    b = len(seqs)
    times = rows.added if rows.added is not None else list(itertools.repeat(added, b))
    # repr once for a batch added now (most of what a bulk ingest does per row is below)
    texts = [repr(t) for t in rows.added] if rows.added is not None else [repr(added)] * b
    if codes:
        image_bytes, text_bytes = _code_bytes(rows.image_codes), _code_bytes(rows.text_codes)
        crcs = [
            md.row_crc(seq, item_id, text, image, added_text, fields, ic + tc)
            for seq, item_id, text, image, added_text, fields, ic, tc in zip(
                seqs, rows.ids, rows.texts, rows.images, texts, rows.fields, image_bytes,
                text_bytes, strict=True,
            )
        ]  # fmt: skip
        image_codes: list[bytes | None] = list(image_bytes)
        text_codes: list[bytes | None] = list(text_bytes)
    else:
        image_codes = text_codes = [None] * b
        crc32 = zlib.crc32
        crcs = [
            crc32(
                f"{seq}\0{'i' if type(item_id) is int else 's'}{item_id}\0{text}\0{image}"
                f"\0{added_text}\0{fields}".encode("utf-8", "surrogatepass")
            )
            for seq, item_id, text, image, added_text, fields in zip(
                seqs, rows.ids, rows.texts, rows.images, texts, rows.fields, strict=True
            )
        ]
    return zip(
        seqs, rows.ids, rows.texts, rows.images, times, rows.fields,
        image_codes, text_codes, crcs, strict=True,
    )  # fmt: skip


def _first_repeat(ids: Sequence[ItemId]) -> ItemId | None:
    seen: set[ItemId] = set()
    for item_id in ids:
        canonical = parse_id(item_id)
        if canonical in seen:
            return canonical
        seen.add(canonical)
    return None
