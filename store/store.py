"""The Store: adds, replaces and deletes in O(batch), exact searches over an immutable view.

Layout under the artifacts folder:
  store/items.sqlite (+ -wal, -shm)   rows, segment list, tombstones, manifest (store/metadata.py)
  store/segments/<name>.seg           immutable segment files (store/segment.py)
  images/<sha256>.<ext>               images of items added through the store (content-addressed)

Writes (one at a time, under the writer lock; searches never take it):
- add: new rows are committed in one SQLite transaction and appended to the in-memory growing
  part; when it reaches SEAL_ROWS it is written as a segment file (fsynced) and then recorded in
  a second transaction. A batch of BULK_ROWS or more is written straight as its own segment,
  before the transaction that commits its rows, so it is never held in the growing part.
- delete: the rows go in one transaction, with a tombstone for each row that sits in a segment.
- the user's fields of each row are also terms rows (store/filters.py), added and deleted in the
  transaction of their row, which filtered searches read.
- every write publishes a new View; the growing part is rebuilt from SQLite at startup (its rows
  are those after the last segment), so nothing acknowledged depends on memory.
A crash at any instant leaves the last committed transaction: a segment file not yet recorded,
or an image not yet referenced, is an orphan that the next open deletes. Compaction
(store/compaction.py) merges segments in the background and is crash-safe the same way.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, cast

import numpy as np

from common.errors import InputError, IntegrityError
from common.fsio import atomic_write_bytes, fsync_dir
from indexes.codes import check_packed, n_words
from indexes.hamming import HammingIndex, LiveMask, check_k
from store import metadata as md
from store.filters import GROWING, Filter, FilterIndex, terms_of, terms_of_json
from store.ids import MAX_INT_ID, ItemId, parse_id
from store.manifest import Manifest, check_manifest
from store.segment import SegmentData, read_segment, write_segment
from store.view import Part, Target, View

logger = logging.getLogger(__name__)

STORE_DIR = "store"
DB_NAME = "items.sqlite"
LOCK_NAME = "LOCK"  # flock: exclusive for a store open in one process, shared by the workers
WRITE_LOCK_NAME = "WRITE_LOCK"  # shared opens: flock held by whichever process is writing
COMPACT_LOCK_NAME = "COMPACT_LOCK"  # shared opens: flock of the one process that merges
SYNC_ATTEMPTS = 5  # a merge elsewhere removed a segment file a snapshot named: read again
SEGMENTS_DIR = "segments"
IMAGES_DIR = "images"
SEAL_ROWS = 65_536  # the growing part becomes a segment at this many rows
BULK_ROWS = 16_384  # a batch at least this large is written as its own segment
MAX_FIELDS_BYTES = 16_384  # the user's fields of one item, as JSON
_EXTENSION = re.compile(r"[a-z0-9]{1,5}")  # of stored image files
SEARCH_ATTEMPTS = 3  # a hit deleted between the view and its metadata read: search again
OnConflict = Literal["error", "replace"]
# Another engine answering the same searches (Milvus): (target, queries, k) -> (dists, seqs).
Searcher = Callable[[Target, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class Listener(Protocol):
    """Told of every committed change, under the writer lock (a mirror kept in step)."""

    def added(self, seqs: np.ndarray, image_codes: np.ndarray, text_codes: np.ndarray) -> None:
        """Rows (seqs ascending) were committed."""

    def deleted(self, seqs: np.ndarray) -> None:
        """Rows were deleted."""


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

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Hits:
    """A search's answer: per query, (item, distance) nearest first, and the view's commit."""

    hits: list[list[tuple[md.Item, int]]]
    commit: int


@dataclass(eq=False)
class _Segment:
    """A loaded segment and its current live mask (replaced, never changed in place)."""

    name: str
    image: HammingIndex
    text: HammingIndex
    rows: int
    crc: int
    mask: LiveMask | None = None  # None while every row is live

    @property
    def seqs(self) -> np.ndarray:
        return self.image.ids

    @property
    def dead(self) -> int:
        return 0 if self.mask is None else self.rows - self.mask.count

    def part(self) -> Part:
        return Part(self.name, self.image, self.text, self.mask)

    def without(self, seqs: np.ndarray) -> None:
        """Mask these seqs (all in this segment) dead: a new bitset, n / 8 bytes copied."""
        current = self.mask if self.mask is not None else LiveMask.all_live(self.rows)
        self.mask = current.without(np.searchsorted(self.seqs, seqs))


@dataclass(eq=False)
class _Growing:
    """Rows not yet in a segment: preallocated buffers, of which views see a prefix."""

    words: int
    capacity: int = 0  # rows it can hold: SEAL_ROWS (0), more after a crash before a seal
    seqs: np.ndarray = field(init=False)
    image: np.ndarray = field(init=False)
    text: np.ndarray = field(init=False)
    mask: np.ndarray = field(init=False)  # copied on delete, so published prefixes never change
    n: int = 0

    def __post_init__(self) -> None:
        self.capacity = self.capacity or SEAL_ROWS
        self.seqs = np.empty(self.capacity, np.int64)
        self.image = np.empty((self.capacity, self.words), np.uint64)
        self.text = np.empty((self.capacity, self.words), np.uint64)
        self.mask = np.ones(self.capacity, np.uint8)

    def part(self, n_bits: int) -> Part:
        n = self.n
        seqs = self.seqs[:n]
        image = HammingIndex.from_arrays(n_bits, self.image[:n], seqs)
        text = HammingIndex.from_arrays(n_bits, self.text[:n], seqs)
        live = self.mask[:n]
        return Part(GROWING, image, text, None if live.all() else LiveMask.of(live))

    def live_data(self) -> SegmentData:
        keep = self.mask[: self.n].astype(bool)
        return SegmentData(
            self.seqs[: self.n][keep].copy(),
            self.image[: self.n][keep].copy(),
            self.text[: self.n][keep].copy(),
        )


class Store:
    """One artifacts folder's indexed items. Open with Store.open or Store.create."""

    def __init__(
        self, artifacts: Path, conn: sqlite3.Connection, manifest: Manifest, *, shared: bool
    ) -> None:
        self.artifacts = artifacts
        self.root = artifacts / STORE_DIR
        # Shared: several processes (`cmh serve --workers N`) have the store open; each write
        # takes WRITE_LOCK and first catches up with the others' commits (_sync), each search
        # catches up when SQLite says another connection committed, and only the holder of
        # COMPACT_LOCK merges segments and removes orphan files.
        self.shared = shared
        self._lock_file = _hold_flock(self.root / LOCK_NAME, shared=shared)
        self._write_lock_file = (self.root / WRITE_LOCK_NAME).open("ab") if shared else None
        self._compact_lock_file: BinaryIO | None = None
        self.compacts = not shared  # whether this process merges (and removes orphans)
        self._seen = threading.local()  # shared: each reader thread's last PRAGMA data_version
        self._layout = 0  # meta "layout": bumped when segments are recorded or merged
        self.manifest = manifest
        self.n_bits = manifest.n_bits
        self._words = n_words(manifest.n_bits)
        self._conn = conn  # the writer's connection: used only under self._lock
        conn.execute(f"PRAGMA cache_size=-{md.WRITER_CACHE_KIB}")
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []  # every thread's, closed by close()
        self._readers_lock = threading.Lock()
        self._lock = threading.Lock()  # serialises writes and the swap of a merge
        self._merge_lock = threading.Lock()  # one merge at a time
        self._segments: list[_Segment] = []  # in seq order, ranges disjoint
        self._growing = _Growing(self._words)
        self._next_seq = int(md.get_meta(conn, "next_seq") or 0)
        self._commit = int(md.get_meta(conn, "commit") or 0)
        self._view = View(self._commit, ())
        self._opened = time.time()
        self.compactor: Any = None  # set by store.compaction.Compactor when started
        self._filters = FilterIndex()  # answers filtered searches (caches behind its own locks)
        self.listener: Listener | None = None

    # ---- opening ---------------------------------------------------------------------------

    @staticmethod
    def exists(artifacts: Path) -> bool:
        """Whether artifacts holds a store."""
        return (artifacts / STORE_DIR / DB_NAME).is_file()

    @classmethod
    def create(cls, artifacts: Path, manifest: Manifest, *, shared: bool = False) -> Store:
        """A new, empty store for codes made as the manifest says."""
        root = artifacts / STORE_DIR
        if (root / DB_NAME).exists():
            raise InputError(f"expected no store in {root}, found one")
        (root / SEGMENTS_DIR).mkdir(parents=True, exist_ok=True)
        # Made under another name and renamed whole: a crash part-way must not leave a database
        # without its manifest, which would neither open nor let the store be created again.
        building = root / f"{DB_NAME}.new"
        for suffix in ("", "-journal", "-wal", "-shm"):
            building.with_name(building.name + suffix).unlink(missing_ok=True)
        conn = sqlite3.connect(building, isolation_level=None)  # rollback journal: one file
        try:
            conn.execute("PRAGMA synchronous=FULL")
            md.init_schema(conn)  # an executescript: it commits by itself
            conn.execute("BEGIN IMMEDIATE")
            md.set_meta(conn, "manifest", json.dumps(asdict(manifest)))
            md.set_meta(conn, "store_id", uuid.uuid4().hex)
            conn.execute("COMMIT")
        finally:
            conn.close()
        os.replace(building, root / DB_NAME)
        fsync_dir(root)
        conn = md.connect(root / DB_NAME)
        logger.info("created an empty %d-bit store in %s", manifest.n_bits, root)
        store = cls(artifacts, conn, manifest, shared=shared)
        store._take_compaction()
        return store

    @classmethod
    def open(
        cls, artifacts: Path, *, expected: Manifest | None = None, shared: bool = False
    ) -> Store:
        """Open and check the store; with `expected`, refuse codes made by another model.

        With `shared`, other processes may open it shared at the same time (not exclusively).
        """
        root = artifacts / STORE_DIR
        path = root / DB_NAME
        if not path.is_file():
            raise InputError(f"expected a store at {path}, found none")
        try:
            return cls._open(artifacts, path, expected=expected, shared=shared)
        except sqlite3.DatabaseError as err:  # "file is not a database", "disk image is malformed"
            raise IntegrityError(
                f"expected a readable store database at {path}, got: {err}; restore it from a "
                "backup or rebuild the store"
            ) from None

    @classmethod
    def _open(
        cls, artifacts: Path, path: Path, *, expected: Manifest | None, shared: bool
    ) -> Store:
        conn = md.connect(path)
        try:
            md.check_schema(conn, path, terms_of=terms_of_json)
            try:
                manifest = Manifest(**json.loads(md.get_meta(conn, "manifest") or ""))
            except (ValueError, TypeError) as err:
                raise InputError(f"expected a manifest in {path}, got: {err}") from err
            if expected is not None:
                check_manifest(manifest, expected)
            store = cls(artifacts, conn, manifest, shared=shared)
        except BaseException:
            conn.close()
            raise
        try:
            store._load()
            store._take_compaction()
        except BaseException:  # a refusal holds neither the database nor the flock
            store.close()
            raise
        return store

    @property
    def store_id(self) -> str:
        """A random id made when the store was created (names its Milvus collections)."""
        return md.get_meta(self._reader(), "store_id") or ""

    def _load(self) -> None:
        start = time.perf_counter()
        (self.root / SEGMENTS_DIR).mkdir(exist_ok=True)
        with self._lock:
            self._reload(force=True)
        logger.info(
            "opened store %s: %d items in %d segments and %d growing rows (%.2f s)",
            self.root,
            self._view.count,
            len(self._segments),
            self._growing.n,
            time.perf_counter() - start,
        )

    def _take_compaction(self) -> None:
        """Become the process that merges and cleans up, if none is (shared opens); then remove
        the files that no commit refers to (writes or merges cut short by a crash)."""
        if self.shared and not self.compacts:
            f = (self.root / COMPACT_LOCK_NAME).open("ab")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                return
            self._compact_lock_file, self.compacts = f, True
        if not self.compacts:
            return
        with self._writing():  # no write is in flight: every unnamed file is an orphan
            known = {name for (name,) in self._conn.execute("SELECT name FROM segments")}
            for orphan in (self.root / SEGMENTS_DIR).iterdir():
                if orphan.name not in known and orphan.is_file():
                    logger.warning("removing %s: no committed write refers to it", orphan)
                    orphan.unlink()

    def _reload(self, *, force: bool = False) -> None:
        """Make the in-memory parts what the database says (self._lock held): at open, and in a
        shared store when another process committed. Reads one snapshot of the database."""
        for _ in range(SYNC_ATTEMPTS):
            try:
                self._reload_once(force=force)
                return
            except FileNotFoundError as err:  # merged away after our snapshot: read a new one
                missing = str(err)
        raise IntegrityError(f"expected the segment files the store names, missing: {missing}")

    def _reload_once(self, *, force: bool) -> None:
        conn = self._conn
        conn.execute("BEGIN")  # one read snapshot (WAL: writers are not blocked)
        try:
            commit = int(md.get_meta(conn, "commit") or 0)
            layout = int(md.get_meta(conn, "layout") or 0)
            if not force and (commit, layout) == (self._commit, self._layout):
                return
            # fetchall: a cursor left half-read (by the exception of a missing file) would keep
            # this snapshot pinned, and every retry would read the same stale segment list
            rows = conn.execute(
                "SELECT name, rows, crc FROM segments ORDER BY first_seq"
            ).fetchall()
            dead = np.fromiter(
                (s for (s,) in conn.execute("SELECT seq FROM tombstones ORDER BY seq")), np.int64
            )
            segments = [self._loaded_segment(name, n_rows, crc) for name, n_rows, crc in rows]
            growing = self._growing_rows(segments)
            next_seq = int(md.get_meta(conn, "next_seq") or 0)
        finally:
            conn.execute("COMMIT")
        for seg in segments:  # tombstones only grow while a segment lives: compare counts
            lo, hi = np.searchsorted(dead, [seg.seqs[0], seg.seqs[-1] + 1]) if seg.rows else (0, 0)
            if hi > lo:
                pos = np.searchsorted(seg.seqs, dead[lo:hi])
                mine = dead[lo:hi][seg.seqs[np.minimum(pos, seg.rows - 1)] == dead[lo:hi]]
                if mine.size != seg.dead:
                    seg.mask = LiveMask.all_live(seg.rows).without(np.searchsorted(seg.seqs, mine))
        self._segments, self._growing = segments, growing
        self._commit, self._layout, self._next_seq = commit, layout, next_seq
        self._publish()

    def _loaded_segment(self, name: str, n_rows: int, crc: int) -> _Segment:
        """The segment `name`: the one already loaded, or read (and checked) from its file."""
        for seg in self._segments:
            if seg.name == name and seg.crc == crc:
                return seg
        path = self.root / SEGMENTS_DIR / name
        if self.shared and not path.exists():  # merged away after our snapshot was taken
            raise FileNotFoundError(path)
        data = read_segment(path, n_bits=self.n_bits, expect_rows=n_rows, expect_crc=crc)
        return self._segment(name, data, crc)

    def _growing_rows(self, segments: list[_Segment]) -> _Growing:
        """The rows after the last segment, live ones only (inside the caller's snapshot).

        Rows the current growing part holds keep their codes; only newer rows are read whole
        and checked, so catching up after another process's write reads that write's rows.
        """
        after = int(segments[-1].seqs[-1]) if segments else -1
        conn, where = self._conn, self.root / DB_NAME
        alive = np.fromiter(
            (
                s
                for (s,) in conn.execute(
                    "SELECT seq FROM items WHERE seq > ? ORDER BY seq", (after,)
                )
            ),
            np.int64,
        )
        old = self._growing
        old_seqs = old.seqs[: old.n]
        pos = np.minimum(np.searchsorted(old_seqs, alive), max(old.n - 1, 0))
        known = (old_seqs[pos] == alive) if old.n else np.zeros(alive.size, bool)
        fresh: dict[int, tuple[bytes, bytes]] = {}
        if not known.all():
            first_new = int(alive[~known][0])
            sql = f"SELECT {md.ROW_COLUMNS} FROM items WHERE seq >= ? ORDER BY seq"
            for row in conn.execute(sql, (first_new,)):
                md.check_row(row, where)
                fresh[row[0]] = (row[6], row[7])
        n = int(alive.size)
        new = _Growing(self._words, max(SEAL_ROWS, n))
        new.seqs[:n] = alive
        new.image[:n][known] = old.image[pos[known]]
        new.text[:n][known] = old.text[pos[known]]
        unknown = alive[~known].tolist()
        if unknown:
            new.image[:n][~known] = _codes(b"".join(fresh[s][0] for s in unknown), self._words)
            new.text[:n][~known] = _codes(b"".join(fresh[s][1] for s in unknown), self._words)
        new.n = n
        return new

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The writer lock: this process's writes one at a time and, in a shared store, every
        process's (WRITE_LOCK); inside it the in-memory parts are what is committed."""
        with self._lock:
            if self._write_lock_file is None:
                yield
                return
            fd = self._write_lock_file.fileno()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self._reload()
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _segment(self, name: str, data: SegmentData, crc: int) -> _Segment:
        image = HammingIndex.from_arrays(self.n_bits, data.image_codes, data.seqs)
        return _Segment(name, image, image.with_codes(data.text_codes), len(data), crc)

    # ---- reading ---------------------------------------------------------------------------

    def view(self) -> View:
        """The current immutable view (one assignment read; never blocks, except that in a
        shared store it first catches up when another process has committed)."""
        if self.shared and self._others_committed():
            with self._lock:
                self._reload()
        return self._view

    def _others_committed(self) -> bool:
        """Whether any other connection committed since this thread last asked (SQLite's
        PRAGMA data_version: a read of the WAL index, no transaction)."""
        version = self._reader().execute("PRAGMA data_version").fetchone()[0]
        changed = version != getattr(self._seen, "version", None)
        self._seen.version = version
        return bool(changed)

    def __len__(self) -> int:
        return self.view().count

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        if conn is None:
            conn = self._readers.conn = md.connect(self.root / DB_NAME)
            with self._readers_lock:  # not self._lock: a search under the writer lock reads
                self._reader_conns.append(conn)
        return conn

    def search(
        self,
        target: Target,
        queries: np.ndarray,
        k: int,
        *,
        searcher: Searcher | None = None,
        where: Filter | None = None,
    ) -> Hits:
        """Exact top-k of each (m, n_words) query among live items (that pass `where`), with
        their metadata.

        The codes are searched in the current view, or by `searcher` (which must hold the same
        rows under the same seqs); the metadata always comes from the store. A filtered search
        is answered by the view (store/filters.py), whatever the searcher.
        """
        check_packed(queries, self.n_bits, name="queries")  # also when no part is searched
        check_k(k)
        if where is not None and where.keeps_all:
            where = None
        for _ in range(SEARCH_ATTEMPTS):
            found = self._search_once(target, queries, k, searcher, where, locked=False)
            if found is not None:
                return found
        # Deletes keep outrunning this search: answer once more with writes held off.
        with self._writing():
            found = self._search_once(target, queries, k, searcher, where, locked=True)
        if found is None:
            raise IntegrityError(f"segment rows have no metadata row in {self.root / DB_NAME}")
        return found

    def _search_once(
        self,
        target: Target,
        queries: np.ndarray,
        k: int,
        searcher: Searcher | None,
        where: Filter | None,
        *,
        locked: bool,
    ) -> Hits | None:
        """One search of the current view with its hits' rows, or None if a hit's row is gone."""
        view = self._view if locked else self.view()
        if where is None:
            dists, seqs = (searcher or view.search)(target, queries, k)
        else:
            dists, seqs = self._filters.search(view, target, queries, k, where, self._reader())
        wanted = np.unique(seqs[seqs >= 0]).tolist()
        items = md.rows_by_seq(self._reader(), wanted, self.root / DB_NAME)
        if len(items) != len(wanted):
            return None
        if where is not None:
            for seq, item in items.items():
                if not where.matches(item.id, item.fields):
                    raise IntegrityError(
                        f"stored item {item.id!r} (seq {seq}) does not pass the filter that the "
                        f"terms table in {self.root / DB_NAME} says it passes: the table was "
                        "changed outside the service; restore the store from a backup or rebuild it"
                    )
        hits = [
            [(items[s], d) for s, d in zip(row_s, row_d, strict=True) if s >= 0]
            for row_s, row_d in zip(seqs.tolist(), dists.tolist(), strict=True)
        ]
        return Hits(hits, view.commit)

    def get(self, item_id: ItemId) -> md.Item | None:
        """The item stored under item_id (5 and "5" alike), or None."""
        row = (
            self._reader()
            .execute(f"SELECT {md.ROW_COLUMNS} FROM items WHERE id = ?", (parse_id(item_id),))
            .fetchone()
        )
        return None if row is None else md.item_from_row(row, self.root / DB_NAME)[1]

    def live_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seqs, image codes, text codes) of every live row in seq order (a mirror's refill)."""
        seqs, image, text = [], [], []
        for part in self.view().parts:
            keep = slice(None) if part.live is None else part.live.to_bool()
            seqs.append(np.asarray(part.seqs)[keep])
            image.append(np.asarray(part.image.codes)[keep])
            text.append(np.asarray(part.text.codes)[keep])
        if not seqs:
            empty = np.empty((0, self._words), np.uint64)
            return np.empty(0, np.int64), empty, empty.copy()
        return np.concatenate(seqs), np.concatenate(image), np.concatenate(text)

    def existing(self, ids: Sequence[ItemId]) -> set[ItemId]:
        """Which of ids are stored (as canonical ids)."""
        return md.existing_ids(self._reader(), [parse_id(i) for i in ids])

    # ---- writing ---------------------------------------------------------------------------

    def add(self, batch: NewItems, *, on_conflict: OnConflict = "error") -> int:
        """Commit a batch durably, then serve it; returns the commit number. All or nothing.

        An id already stored is an InputError, or (on_conflict="replace") its item is replaced
        by the new one in the same transaction.
        """
        b = len(batch)
        rows, to_write = self._rows(batch)
        with self._writing():
            # Under the lock: a delete's image clean-up cannot remove a file this add refers to.
            for relative, data in to_write.items():
                if not (self.artifacts / relative).is_file():
                    atomic_write_bytes(self.artifacts / relative, data)
            seqs = np.arange(self._next_seq, self._next_seq + b, dtype=np.int64)
            bulk = b >= BULK_ROWS
            if bulk and self._growing.n:
                self._seal()
            segment = None
            if bulk:  # the codes go to disk before the rows that name them are committed
                segment = self._write_segment(
                    SegmentData(seqs, batch.image_codes, batch.text_codes)
                )
            added = time.time()
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                replaced: list[tuple[int, str, ItemId]] = []
                if on_conflict == "replace":
                    replaced = self._delete_rows(list(batch.ids))
                conn.execute("SAVEPOINT batch")
                try:
                    conn.executemany(
                        "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        _with_seqs(rows, seqs.tolist(), added, codes=segment is None),
                    )
                except sqlite3.IntegrityError:
                    conn.execute("ROLLBACK TO batch")  # the batch's rows inserted before the clash
                    taken = md.existing_ids(conn, rows.ids)
                    repeated = _first_repeat(batch.ids)
                    raise InputError(
                        f"expected new ids, got {sorted(map(str, taken))[:10]} already indexed"
                        if taken
                        else f"expected unique ids, got id {repeated!r} twice in this batch"
                    ) from None
                seq_list = seqs.tolist()
                # in (term, seq) order: each term's new rows go to one place in its B-tree
                md.insert_terms(conn, sorted((t, seq_list[i]) for i, ts in rows.terms for t in ts))
                if segment is not None:
                    self._record_segment(segment)
                self._next_seq += b
                md.set_meta(conn, "next_seq", str(self._next_seq))
                self._bump_commit()
                conn.execute("COMMIT")
            except BaseException:
                self._roll_back()
                if segment is not None:
                    (self.root / SEGMENTS_DIR / segment.name).unlink(missing_ok=True)
                self._collect_images(list(to_write))  # written for this batch alone
                raise
            self._forget([r[0] for r in replaced])
            if self.listener is not None:
                if replaced:
                    self.listener.deleted(np.asarray([r[0] for r in replaced], np.int64))
                self.listener.added(seqs, batch.image_codes, batch.text_codes)
            if segment is not None:
                self._segments.append(segment)
            else:
                self._append_growing(seqs, batch.image_codes, batch.text_codes)
            self._publish()
            if self._growing.n >= SEAL_ROWS:
                self._seal()
            self._collect_images([r[1] for r in replaced])
            self._wake_compactor()
            return self._commit

    def delete(self, ids: Sequence[ItemId]) -> list[ItemId]:
        """Delete these ids durably, then stop serving them; returns the ids that were there."""
        with self._writing():
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                gone = self._delete_rows(list(ids))
                if gone:
                    self._bump_commit()
                conn.execute("COMMIT")
            except BaseException:
                self._roll_back()
                raise
            self._forget([g[0] for g in gone])
            if self.listener is not None and gone:
                self.listener.deleted(np.asarray([g[0] for g in gone], np.int64))
            self._publish()
            self._collect_images([g[1] for g in gone])
            self._wake_compactor()
            return [g[2] for g in gone]

    def _rows(self, batch: NewItems) -> tuple[_Rows, dict[str, bytes]]:
        """(id, text, image, fields JSON, codes bytes) per item, checked before any lock, and
        the image files to write (path relative to artifacts -> bytes)."""
        b = len(batch)
        for name, codes in (("image", batch.image_codes), ("text", batch.text_codes)):
            check_packed(codes, self.n_bits, name=f"{name} codes")
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
        to_write: dict[str, bytes] = {}
        for i, given in enumerate(image_data):
            if given is not None:
                data, extension = given
                if not _EXTENSION.fullmatch(extension):
                    raise InputError(f"expected an image extension like 'jpg', got {extension!r}")
                images[i] = f"{IMAGES_DIR}/{hashlib.sha256(data).hexdigest()}.{extension}"
                to_write[images[i]] = data
        rows = _Rows(
            ids=_checked_ids(batch.ids),
            texts=_checked_texts(batch.texts, "texts"),
            images=_checked_texts(images, "images"),
            fields=["{}"] * b if batch.fields is None else [_fields_json(f) for f in fields],
            terms=[]
            if batch.fields is None
            else [(i, terms_of(f)) for i, f in enumerate(fields) if f],
            image_codes=batch.image_codes,
            text_codes=batch.text_codes,
        )
        return rows, to_write

    def _delete_rows(self, ids: list[ItemId]) -> list[tuple[int, str, ItemId]]:
        """Delete the rows of ids (and their terms) in the open transaction, tombstoning those
        in segments.

        Returns (seq, image, id) of each row that was there.
        """
        gone: list[tuple[int, str, ItemId]] = []
        terms: list[tuple[str, int]] = []
        for part in md.chunks([parse_id(i) for i in ids]):
            sql = (
                f"DELETE FROM items WHERE id IN ({md.marks(len(part))}) "
                "RETURNING seq, image, id, fields"
            )
            for seq, image, item_id, fields in self._conn.execute(sql, tuple(part)).fetchall():
                gone.append((int(seq), str(image), item_id))
                if fields != "{}":
                    terms.extend((t, int(seq)) for t in terms_of_json(fields))
        md.delete_terms(self._conn, terms)
        sealed_up_to = self._sealed_up_to()
        self._conn.executemany(
            "INSERT INTO tombstones VALUES (?)", [(g[0],) for g in gone if g[0] <= sealed_up_to]
        )
        return gone

    def _sealed_up_to(self) -> int:
        """The last seq in a segment (-1 without segments): later rows are growing."""
        return int(self._segments[-1].seqs[-1]) if self._segments else -1

    def _forget(self, seqs: list[int]) -> None:
        """Mask committed deletions out of the in-memory parts (new mask arrays)."""
        if not seqs:
            return
        firsts = [int(s.seqs[0]) for s in self._segments]
        by_segment: dict[int, list[int]] = {}
        growing = []
        sealed_up_to = self._sealed_up_to()
        for seq in seqs:
            if seq > sealed_up_to:
                growing.append(seq)
            else:
                by_segment.setdefault(bisect.bisect_right(firsts, seq) - 1, []).append(seq)
        for index, wanted in by_segment.items():
            self._segments[index].without(np.asarray(wanted, np.int64))
        if growing:
            g = self._growing
            mask = g.mask.copy()
            mask[np.searchsorted(g.seqs[: g.n], np.asarray(growing, np.int64))] = 0
            g.mask = mask

    def _append_growing(self, seqs: np.ndarray, image: np.ndarray, text: np.ndarray) -> None:
        """Copy committed rows into the growing part, sealing it each time it fills."""
        start = 0
        while start < len(seqs):
            if self._growing.n >= SEAL_ROWS:
                self._seal(publish=False)  # the caller publishes the whole batch
            g = self._growing
            take = min(SEAL_ROWS - g.n, len(seqs) - start)
            g.seqs[g.n : g.n + take] = seqs[start : start + take]
            g.image[g.n : g.n + take] = image[start : start + take]
            g.text[g.n : g.n + take] = text[start : start + take]
            g.n += take
            start += take

    def _seal(self, *, publish: bool = True) -> None:
        """Write the growing part's live rows as a segment and record it (writer lock held)."""
        data = self._growing.live_data()
        if len(data):
            segment = self._write_segment(data)
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._record_segment(segment)
                conn.execute("COMMIT")
            except BaseException:
                self._roll_back()
                raise
            self._segments.append(segment)
        self._growing = _Growing(self._words)
        if publish:
            self._publish()
        logger.info("sealed %d growing rows into a segment", len(data))

    def _write_segment(self, data: SegmentData) -> _Segment:
        name = f"seg-{int(data.seqs[0]):016d}-{uuid.uuid4().hex[:8]}.seg"
        crc = write_segment(self.root / SEGMENTS_DIR / name, n_bits=self.n_bits, data=data)
        loaded = read_segment(
            self.root / SEGMENTS_DIR / name,
            n_bits=self.n_bits,
            expect_rows=len(data),
            expect_crc=crc,
        )
        return self._segment(name, loaded, crc)

    def _record_segment(self, seg: _Segment) -> None:
        self._conn.execute(
            "INSERT INTO segments VALUES (?, ?, ?, ?, ?)",
            (seg.name, int(seg.seqs[0]), int(seg.seqs[-1]), seg.rows, seg.crc),
        )
        self.bump_layout()

    def bump_layout(self) -> None:
        """Say in the open transaction that the segments changed (a seal, a bulk add, a merge),
        so that processes sharing the store reload them."""
        self._layout += 1
        md.set_meta(self._conn, "layout", str(self._layout))

    def _roll_back(self) -> None:
        """Roll back the open transaction and the counters it had moved on: a shared store
        compares them with the database's to know whether it is up to date."""
        conn = self._conn
        conn.execute("ROLLBACK")
        self._next_seq = int(md.get_meta(conn, "next_seq") or 0)
        self._commit = int(md.get_meta(conn, "commit") or 0)
        self._layout = int(md.get_meta(conn, "layout") or 0)

    def _bump_commit(self) -> None:
        self._commit += 1
        md.set_meta(self._conn, "commit", str(self._commit))

    def _publish(self) -> None:
        parts = [seg.part() for seg in self._segments]
        if self._growing.n:
            parts.append(self._growing.part(self.n_bits))
        self._view = View(self._commit, tuple(parts))

    def _collect_images(self, images: list[str]) -> None:
        """Remove store-owned image files that no row refers to any more."""
        for image in set(images):
            if image.startswith(f"{IMAGES_DIR}/") and not md.image_referenced(self._conn, image):
                (self.artifacts / image).unlink(missing_ok=True)

    def collect_orphan_images(self) -> int:
        """Remove images/ files no row refers to, left by a crash before this open; how many.

        Only the process that compacts does this (in a shared store, others' writes are in
        flight only while they hold WRITE_LOCK, which each check here takes).
        """
        folder = self.artifacts / IMAGES_DIR
        if not self.compacts or not folder.is_dir():
            return 0
        removed = 0
        for path in folder.iterdir():
            relative = f"{IMAGES_DIR}/{path.name}"
            with self._writing():
                if path.stat().st_mtime >= self._opened:  # written by this process: in flight
                    continue
                if not md.image_referenced(self._conn, relative):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def _wake_compactor(self) -> None:
        if self.compactor is not None:
            self.compactor.wake()

    def close(self) -> None:
        """Stop the compactor and close the writer's connection."""
        if self.compactor is not None:
            self.compactor.stop()
        with self._lock:
            self._conn.close()
            with self._readers_lock:
                for reader in self._reader_conns:  # other threads' too (check_same_thread=False)
                    reader.close()
                self._reader_conns.clear()
        for f in (self._write_lock_file, self._compact_lock_file, self._lock_file):
            if f is not None:
                f.close()  # releases its flock

    def remove_files(self) -> None:
        """Delete the store's folder (after close); the images stay."""
        shutil.rmtree(self.root, ignore_errors=True)


def _hold_flock(path: Path, *, shared: bool) -> BinaryIO:
    """Hold path's flock, exclusive (one process has the store) or shared (workers of one
    server share it); the kernel frees it on exit. Refuses when the other kind is held."""
    f = path.open("ab")
    try:
        fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise InputError(
            f"expected the store {path.parent} to be free, but another process has it open "
            "(a running server or build); stop it, or build through the server's API"
        ) from None
    return f


def _codes(blob: bytes, words: int) -> np.ndarray:
    """(n, words) uint64 codes from their little-endian bytes, back to back."""
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64).reshape(-1, words)


def _fields_json(fields: dict[str, Any]) -> str:
    if type(fields) is dict and not fields:  # the common case, without json.dumps
        return "{}"
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise InputError(f"expected the item's fields as an object, got {type(fields).__name__}")
    try:
        text = json.dumps(fields, ensure_ascii=False, sort_keys=True, allow_nan=False)
        text.encode("utf-8")
    except (ValueError, TypeError, RecursionError) as err:  # NaN, a set, a lone surrogate
        raise InputError(f"expected the item's fields as JSON, got: {err}") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FIELDS_BYTES:
        raise InputError(f"expected an item's fields to take at most {MAX_FIELDS_BYTES} bytes")
    return text


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


@dataclass(frozen=True)
class _Rows:
    """A checked batch, column by column, as SQLite will store it."""

    ids: list[ItemId]
    texts: list[str]
    images: list[str]
    fields: list[str]  # JSON objects
    terms: list[tuple[int, list[str]]]  # (row, its fields' terms) of the rows with fields
    image_codes: np.ndarray  # (b, words) uint64, checked
    text_codes: np.ndarray


def _code_bytes(codes: np.ndarray) -> list[bytes]:
    """Each row's code as its little-endian bytes."""
    data = np.ascontiguousarray(codes, dtype="<u8")
    width = 8 * data.shape[1]
    blob = data.tobytes()
    return [blob[i : i + width] for i in range(0, len(blob), width)]


def _with_seqs(rows: _Rows, seqs: list[int], added: float, *, codes: bool) -> Any:
    """The rows as SQLite tuples, each with its seq, added time and CRC.

    Without `codes` (a bulk batch, whose codes are in its own checksummed segment file) the
    code columns are NULL: the rows are smaller and insert faster, and the CRC is md.row_crc's
    without codes written out inline (one f-string per row: this is most of a bulk ingest's
    Python time), which tests check against md.row_crc.
    """
    b = len(seqs)
    added_text = repr(added)
    if codes:
        image_bytes, text_bytes = _code_bytes(rows.image_codes), _code_bytes(rows.text_codes)
        crcs = [
            md.row_crc(seq, item_id, text, image, added_text, fields, ic + tc)
            for seq, item_id, text, image, fields, ic, tc in zip(
                seqs, rows.ids, rows.texts, rows.images, rows.fields, image_bytes, text_bytes,
                strict=True,
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
            for seq, item_id, text, image, fields in zip(
                seqs, rows.ids, rows.texts, rows.images, rows.fields, strict=True
            )
        ]
    return zip(
        seqs, rows.ids, rows.texts, rows.images, itertools.repeat(added, b), rows.fields,
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
