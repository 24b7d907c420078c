"""Item metadata in SQLite: the store's record and its commit point.

One database file (WAL journal, synchronous=FULL: a committed transaction is on disk when COMMIT
returns) holds every item's row (user id, caption, image reference, added time, user fields, both
codes, a CRC-32 of all of it), the list of live segment files with their sizes and header CRCs,
the tombstones of deleted rows that still sit in a segment, the terms of the user fields (one row
per field value per item, which filtered searches read: store/filters.py) and the manifest. A
write changes rows, terms, segments and tombstones in one transaction, so the database alone says
what is committed. Nothing is loaded into memory at startup but the tombstones and the rows of
the growing part.

Schema version 2 added the terms table; a version-1 store is upgraded when it is opened (one
transaction that fills the table from the rows' fields), so older stores keep opening.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InputError, IntegrityError
from store.ids import ItemId

SCHEMA_VERSION = 3
UPGRADABLE = ("1", "2")  # older schema versions that check_schema upgrades in place
# Version 3 writes integers from 2**63 on as the float they equal (store.filters): the rows that
# may hold one (a run of 19 digits in their fields) get their terms rewritten by the upgrade.
_LONG_NUMBER = "*" + "[0-9]" * 19 + "*"
WRITER_CACHE_KIB = 131_072  # the writer's page cache: big batches touch many index pages
SQL_BATCH = 500  # values per `IN (...)` list (well under SQLite's parameter limit)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,      -- insertion order: the tie order of every search
    id NOT NULL UNIQUE,           -- the user's id, an integer or a string (no type affinity)
    text TEXT NOT NULL,
    image TEXT NOT NULL,          -- path relative to the artifacts folder
    added REAL NOT NULL,
    fields TEXT NOT NULL,         -- the user's fields, a JSON object
    image_code BLOB,              -- NULL for rows of a bulk segment: the segment file has them
    text_code BLOB,
    crc INTEGER NOT NULL          -- CRC-32 of everything above (row_crc)
);
CREATE INDEX IF NOT EXISTS items_stored_image ON items (image) WHERE image GLOB 'images/*';
CREATE TABLE IF NOT EXISTS segments (
    name TEXT PRIMARY KEY,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    crc INTEGER NOT NULL          -- the segment file's header CRC
);
CREATE TABLE IF NOT EXISTS tombstones (seq INTEGER PRIMARY KEY);
"""
TERMS_TABLE = """
CREATE TABLE IF NOT EXISTS terms (
    term TEXT NOT NULL,           -- one field value of an item: JSON [field, value] (filters.term)
    seq INTEGER NOT NULL,         -- the item's row; (term, seq) order is each term's posting list
    PRIMARY KEY (term, seq)
) WITHOUT ROWID
"""
ROW_COLUMNS = "seq, id, text, image, added, fields, image_code, text_code, crc"


@dataclass(frozen=True)
class Item:
    """One indexed pair's metadata, as the user gave it."""

    id: ItemId  # the user's id
    text: str  # the caption
    image: str  # the stored image, relative to the artifacts folder
    added: float  # when it was added (seconds since the epoch)
    fields: dict[str, Any]  # the user's fields


def row_crc(
    seq: int, item_id: ItemId, text: str, image: str, added: str, fields_json: str, codes: bytes
) -> int:
    """CRC-32 of one row's values (`added` as repr(float)): a hand-edited caption or swapped ids
    fail it.

    The values are joined with NUL, which no stored text holds (texts and images refuse it, ids
    refuse control characters, JSON escapes it), so the join is unambiguous; the id carries its
    type. A join, not json.dumps: this runs once per row of every bulk ingest.
    """
    kind = "i" if type(item_id) is int else "s"
    head = "\0".join((str(seq), kind + str(item_id), text, image, added, fields_json))
    return zlib.crc32(codes, zlib.crc32(head.encode("utf-8", "surrogatepass")))


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, synchronous=FULL."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def init_schema(conn: sqlite3.Connection) -> None:
    """Create the tables of a new store."""
    conn.executescript(SCHEMA)
    conn.execute(TERMS_TABLE)
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


def _schema_version(conn: sqlite3.Connection, path: Path) -> str | None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as err:
        raise InputError(f"expected a cmh store database at {path}, got: {err}") from err
    return None if row is None else str(row[0])


def check_schema(
    conn: sqlite3.Connection,
    path: Path,
    *,
    terms_of: Callable[[str], Iterable[str]],
    reterm: Callable[[str], tuple[list[str], list[str]]],
    upgrade_rows: int,
) -> None:
    """Refuse a database that is not a store of this version, upgrading an older one in place.

    The upgrade (version 1 had no terms table; version 2 wrote integers from 2**63 on as such)
    is one transaction, re-checked inside it, so that workers opening the store at once upgrade
    it once; `terms_of` maps a row's fields JSON to its terms (store.filters.terms_of_json),
    `reterm` to the terms version 3 changes (store.filters.retermed_v3); the upgrade reads
    `upgrade_rows` rows at a time.
    """
    found = _schema_version(conn, path)
    if found in UPGRADABLE:
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = _schema_version(conn, path)
            if found == "1":
                conn.execute(TERMS_TABLE)
                sql = "SELECT seq, fields FROM items WHERE seq > ? AND fields != '{}' ORDER BY seq"
                after = -1
                while rows := conn.execute(f"{sql} LIMIT {int(upgrade_rows)}", (after,)).fetchall():
                    conn.executemany(
                        "INSERT OR IGNORE INTO terms VALUES (?, ?)",
                        sorted((t, seq) for seq, fields in rows for t in terms_of(fields)),
                    )
                    after = rows[-1][0]
            elif found == "2":
                _reterm_long_numbers(conn, reterm=reterm, upgrade_rows=upgrade_rows)
            if found in UPGRADABLE:
                set_meta(conn, "schema_version", str(SCHEMA_VERSION))
                found = str(SCHEMA_VERSION)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    if found != str(SCHEMA_VERSION):
        raise InputError(f"expected store schema version {SCHEMA_VERSION} in {path}, got {found}")


def _reterm_long_numbers(
    conn: sqlite3.Connection,
    *,
    reterm: Callable[[str], tuple[list[str], list[str]]],
    upgrade_rows: int,
) -> None:
    """Version 2 -> 3, in the caller's transaction: rewrite the terms of the rows whose fields
    may hold an integer of 2**63 or more; reterm(fields JSON) gives (terms gone, terms new)
    (store.filters.retermed_v3)."""
    sql = "SELECT seq, fields FROM items WHERE seq > ? AND fields GLOB ? ORDER BY seq"
    after = -1
    while rows := conn.execute(
        f"{sql} LIMIT {int(upgrade_rows)}", (after, _LONG_NUMBER)
    ).fetchall():
        for seq, fields in rows:
            gone, new = reterm(fields)
            conn.executemany(
                "DELETE FROM terms WHERE term = ? AND seq = ?", [(t, seq) for t in gone]
            )
            conn.executemany("INSERT OR IGNORE INTO terms VALUES (?, ?)", [(t, seq) for t in new])
        after = rows[-1][0]


def connect_read_only(path: Path, *, timeout: float = 60) -> sqlite3.Connection:
    """A read-only connection to a store database (no lock, no write: it runs beside a server
    that has the store open); autocommit, so each statement reads the latest commit unless the
    caller opens a transaction. URI filenames are on, so ATTACH takes `file:...?mode=ro` too."""
    return sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout, isolation_level=None
    )


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    """The meta value under key, or None."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    """Set a meta value (inside the caller's transaction)."""
    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def chunks(values: Sequence[Any], size: int = SQL_BATCH) -> Iterator[Sequence[Any]]:
    """values in pieces of at most size."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def marks(n: int) -> str:
    """'?, ?, ...' with n placeholders."""
    return ", ".join("?" * n)


def existing_ids(conn: sqlite3.Connection, ids: Sequence[ItemId]) -> set[ItemId]:
    """Which of ids are stored."""
    found: set[ItemId] = set()
    for part in chunks(ids):
        sql = f"SELECT id FROM items WHERE id IN ({marks(len(part))})"
        found.update(row[0] for row in conn.execute(sql, tuple(part)))
    return found


def check_row(row: tuple[Any, ...], where: Path) -> None:
    """IntegrityError unless the row's values still give its CRC."""
    seq, item_id, text, image, added, fields_json, image_code, text_code, crc = row
    codes = (image_code or b"") + (text_code or b"")  # no codes: a row of a bulk segment
    if row_crc(seq, item_id, text, image, repr(added), fields_json, codes) != crc:
        raise IntegrityError(
            f"stored item {item_id!r} (seq {seq}) failed its checksum in {where}: the row was "
            "changed outside the service; restore the store from a backup or rebuild it"
        )


def item_from_row(row: tuple[Any, ...], where: Path) -> tuple[int, Item]:
    """(seq, Item) of a row; IntegrityError if it was altered."""
    check_row(row, where)
    seq, item_id, text, image, added, fields_json = row[:6]
    return seq, Item(item_id, text, image, added, json.loads(fields_json))


def rows_by_seq(conn: sqlite3.Connection, seqs: Iterable[int], where: Path) -> dict[int, Item]:
    """The items of these seqs (absent ones are left out), each checked."""
    out: dict[int, Item] = {}
    for part in chunks(list(seqs)):
        sql = f"SELECT {ROW_COLUMNS} FROM items WHERE seq IN ({marks(len(part))})"
        for row in conn.execute(sql, tuple(part)):
            seq, item = item_from_row(row, where)
            out[seq] = item
    return out


def image_referenced(conn: sqlite3.Connection, image: str) -> bool:
    """Whether any row still refers to a store-owned image."""
    sql = "SELECT 1 FROM items WHERE image = ? AND image GLOB 'images/*' LIMIT 1"
    return conn.execute(sql, (image,)).fetchone() is not None


def insert_terms(conn: sqlite3.Connection, terms: Iterable[tuple[str, int]]) -> None:
    """Record (term, seq) pairs in the open transaction."""
    conn.executemany("INSERT INTO terms VALUES (?, ?)", terms)


def delete_terms(conn: sqlite3.Connection, terms: Iterable[tuple[str, int]]) -> None:
    """Remove (term, seq) pairs in the open transaction (primary-key deletes: no scan)."""
    conn.executemany("DELETE FROM terms WHERE term = ? AND seq = ?", terms)


def term_seqs(conn: sqlite3.Connection, term: str, start: int, stop: int) -> np.ndarray:
    """(r,) int64 ascending seqs in [start, stop) of the rows holding term (its posting list)."""
    sql = "SELECT seq FROM terms WHERE term = ? AND seq >= ? AND seq < ? ORDER BY seq"
    return np.fromiter((s for (s,) in conn.execute(sql, (term, start, stop))), np.int64)


def seqs_of_ids(conn: sqlite3.Connection, ids: Sequence[ItemId]) -> np.ndarray:
    """(r,) int64 ascending seqs of the stored items among ids (canonical ids)."""
    seqs: list[int] = []
    for part in chunks(ids):
        sql = f"SELECT seq FROM items WHERE id IN ({marks(len(part))})"
        seqs.extend(s for (s,) in conn.execute(sql, tuple(part)))
    return np.sort(np.asarray(seqs, np.int64))
