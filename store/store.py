"""The Store: adds, replaces and deletes in O(batch), exact searches over an immutable view.

Layout under the artifacts folder:
  store/items.sqlite (+ -wal, -shm)   rows, segment list, tombstones, manifest (store/metadata.py)
  store/segments/<name>.seg           immutable segment files (store/segment.py)
  images/<sha256>.<ext>               images of items added through the store (content-addressed)

Writes (one at a time, under the writer lock; searches never take it):
- add: new rows are committed in one SQLite transaction and appended to the in-memory growing
  part; when it reaches config.seal_rows it is written as a segment file (fsynced) and then
  recorded in a second transaction. A batch of config.bulk_rows or more is written straight as
  its own segment, before the transaction that commits its rows, so it is never held in the
  growing part (the knobs: store/config.py).
- delete: the rows go in one transaction, with a tombstone for each row that sits in a segment.
- the user's fields of each row are also terms rows (store/filters.py), added and deleted in the
  transaction of their row, which filtered searches read.
- every write publishes a new View; the growing part is rebuilt from SQLite at startup (its rows
  are those after the last segment), so nothing acknowledged depends on memory.
A crash at any instant leaves the last committed transaction: a segment file not yet recorded,
or an image not yet referenced, is an orphan that the next open deletes. Compaction
(store/compaction.py) merges segments in the background and is crash-safe the same way.

What holds none of the Store's state lives beside it: store/rows.py (a batch checked, its rows
inserted and deleted), store/parts.py (the in-memory segments and growing part), store/locks.py
(the flocks between processes), store/view.py (the immutable view and its search) and
store/compaction.py (the merge policy and thread, which change the store only through
plan_merge / write_segment / record_merge here).

Over 400 lines because the Store is one object whose every method keeps one invariant (under the
writer lock, the in-memory parts, the counters next_seq / commit / layout and the database say
the same thing; a View is published only from that state), which spreading its methods over
modules would spread with them.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple, ParamSpec, TypeVar

import numpy as np

from common.errors import InputError, IntegrityError, NoSpaceError, StoreRetired, is_no_space
from common.fsio import fsync_dir
from indexes.asymmetric import Asymmetric, hamming_scores
from indexes.codes import check_packed, n_words
from indexes.hamming import HammingIndex, LiveMask, check_k
from store import metadata as md
from store.config import DEFAULT_CONFIG, StoreConfig
from store.filters import Filter, FilterIndex, retermed_v3, terms_of_json
from store.ids import ItemId, parse_id
from store.locks import (
    COMPACT_LOCK_NAME,
    LOCK_NAME,
    WRITE_LOCK_NAME,
    exclusive,
    hold_flock,
    try_exclusive,
)
from store.manifest import Manifest, check_manifest
from store.parts import (
    Growing,
    LoadedSegment,
    Merge,
    apply_tombstones,
    deleted_meanwhile,
    reloaded_growing,
)
from store.rows import (
    IMAGES_DIR,
    NewItems,
    checked_rows,
    delete_rows,
    insert_rows,
    put_image,
)
from store.segment import SegmentData, read_segment, write_segment
from store.view import Target, View

logger = logging.getLogger(__name__)

STORE_DIR = "store"
DB_NAME = "items.sqlite"
RETIRED_KEY = "retired"  # meta: "1" once a version switch retired the store (no more writes)
SYNC_ATTEMPTS = 5  # a merge elsewhere removed a segment file a snapshot named: read again
SEGMENTS_DIR = "segments"
SEARCH_ATTEMPTS = 3  # a hit deleted between the view and its metadata read: search again
OnConflict = Literal["error", "replace"]


class _Ranking(NamedTuple):
    """How a search ranks: by `asymmetric`'s weighted distance (else Hamming), within `radius`."""

    asymmetric: Asymmetric | None
    radius: int | None


@dataclass(frozen=True)
class Hits:
    """A search's answer: per query, (item, Hamming distance) best first, the score each hit
    was ranked by (indexes/asymmetric.py: a cosine, higher is closer), and the view's commit."""

    hits: list[list[tuple[md.Item, int]]]
    commit: int
    scores: list[list[float]]


P = ParamSpec("P")
R = TypeVar("R")


def _classified(method: Callable[P, R]) -> Callable[P, R]:
    """Store errors a client can act on, as such: a full device is a NoSpaceError naming the
    folder, a damaged metadata file an IntegrityError naming it (sqlite says neither)."""

    @functools.wraps(method)
    def classified(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except (sqlite3.DatabaseError, OSError) as err:
            if isinstance(err, sqlite3.IntegrityError):
                raise
            store = args[0]
            assert isinstance(store, Store)
            if is_no_space(err):
                raise NoSpaceError(
                    f"no space left on the device holding {store.root}: nothing of this write "
                    "was kept; free some space and retry"
                ) from err
            if isinstance(err, sqlite3.DatabaseError):
                raise IntegrityError(
                    f"the store's metadata {store.root / DB_NAME} cannot be read ({err}): restore "
                    "it from a backup, or rebuild the store"
                ) from err
            raise

    return classified


@dataclass(frozen=True)
class Deleted:
    """What a delete removed: the ids that were stored, and the commit that removed them (the
    commit already current when none was)."""

    ids: list[ItemId]
    commit: int


class Store:
    """One artifacts folder's indexed items. Open with Store.open or Store.create."""

    def __init__(
        self,
        artifacts: Path,
        conn: sqlite3.Connection,
        manifest: Manifest,
        *,
        shared: bool,
        config: StoreConfig,
    ) -> None:
        self.artifacts = artifacts
        self.config = config
        self.root = artifacts / STORE_DIR
        # Shared: several processes (`cmh serve --workers N`) have the store open; each write
        # takes WRITE_LOCK and first catches up with the others' commits (_reload), each search
        # catches up when SQLite says another connection committed, and only the holder of
        # COMPACT_LOCK merges segments and removes orphan files.
        self.shared = shared
        self._lock_file = hold_flock(self.root / LOCK_NAME, shared=shared)
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
        self.merge_lock = threading.Lock()  # one merge at a time (store/compaction.py)
        self._segments: list[LoadedSegment] = []  # in seq order, ranges disjoint
        self._growing = Growing(self._words, config.seal_rows)
        self._next_seq = int(md.get_meta(conn, "next_seq") or 0)
        self._commit = int(md.get_meta(conn, "commit") or 0)
        self._view = View(self._commit, ())
        self._opened = time.time()
        self.compactor: Any = None  # set by store.compaction.Compactor when started
        self._filters = FilterIndex(config)  # answers filtered searches (caches behind locks)

    # ---- opening ---------------------------------------------------------------------------

    @staticmethod
    def exists(artifacts: Path) -> bool:
        """Whether artifacts holds a store."""
        return (artifacts / STORE_DIR / DB_NAME).is_file()

    @classmethod
    def create(
        cls,
        artifacts: Path,
        manifest: Manifest,
        *,
        shared: bool = False,
        config: StoreConfig = DEFAULT_CONFIG,
    ) -> Store:
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
        store = cls(artifacts, conn, manifest, shared=shared, config=config)
        store.take_compaction()
        return store

    @classmethod
    def open(
        cls,
        artifacts: Path,
        *,
        expected: Manifest | None = None,
        shared: bool = False,
        config: StoreConfig = DEFAULT_CONFIG,
    ) -> Store:
        """Open and check the store; with `expected`, refuse codes made by another model.

        With `shared`, other processes may open it shared at the same time (not exclusively).
        """
        root = artifacts / STORE_DIR
        path = root / DB_NAME
        if not path.is_file():
            raise InputError(f"expected a store at {path}, found none")
        try:
            return cls._open(artifacts, path, expected=expected, shared=shared, config=config)
        except sqlite3.DatabaseError as err:  # "file is not a database", "disk image is malformed"
            raise IntegrityError(
                f"expected a readable store database at {path}, got: {err}; restore it from a "
                "backup or rebuild the store"
            ) from None

    @classmethod
    def _open(
        cls,
        artifacts: Path,
        path: Path,
        *,
        expected: Manifest | None,
        shared: bool,
        config: StoreConfig,
    ) -> Store:
        conn = md.connect(path)
        try:
            md.check_schema(
                conn,
                path,
                terms_of=terms_of_json,
                reterm=retermed_v3,
                upgrade_rows=config.upgrade_rows,
            )
            try:
                manifest = Manifest(**json.loads(md.get_meta(conn, "manifest") or ""))
            except (ValueError, TypeError) as err:
                raise InputError(f"expected a manifest in {path}, got: {err}") from err
            if expected is not None:
                check_manifest(manifest, expected)
            store = cls(artifacts, conn, manifest, shared=shared, config=config)
        except BaseException:
            conn.close()
            raise
        try:
            store._load()
            store.take_compaction()
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
            self._reload(force=True, check=True)
        logger.info(
            "opened store %s: %d items in %d segments and %d growing rows (%.2f s)",
            self.root,
            self._view.count,
            len(self._segments),
            self._growing.n,
            time.perf_counter() - start,
        )

    def take_compaction(self) -> None:
        """Become the process that merges and cleans up, if none is (shared opens); then remove
        the files that no commit refers to (writes or merges cut short by a crash)."""
        if self.shared and not self.compacts:
            f = try_exclusive(self.root / COMPACT_LOCK_NAME)
            if f is None:
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

    def _reload(self, *, force: bool = False, check: bool = False) -> None:
        """Make the in-memory parts what the database says (self._lock held): at open, and in a
        shared store when another process committed. Reads one snapshot of the database; with
        `check` (at open), checks its tombstones in it (_check_tombstones)."""
        for _ in range(SYNC_ATTEMPTS):
            try:
                self._reload_once(force=force, check=check)
                return
            except FileNotFoundError as err:  # merged away after our snapshot: read a new one
                missing = str(err)
        raise IntegrityError(f"expected the segment files the store names, missing: {missing}")

    def _reload_once(self, *, force: bool, check: bool) -> None:
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
            after = int(segments[-1].seqs[-1]) if segments else -1
            if check:
                self._check_tombstones(sum(n for _, n, _ in rows) - dead.size, after)
            growing = reloaded_growing(
                self._growing,
                conn,
                after=after,
                where=self.root / DB_NAME,
                seal_rows=self.config.seal_rows,
            )
            next_seq = int(md.get_meta(conn, "next_seq") or 0)
        finally:
            conn.execute("COMMIT")
        apply_tombstones(segments, dead)
        self._segments, self._growing = segments, growing
        self._commit, self._layout, self._next_seq = commit, layout, next_seq
        self._publish()

    def _check_tombstones(self, live: int, sealed_up_to: int) -> None:
        """In the open read snapshot: tombstones mark only rows that are gone, and every live
        segment row (`live` of them, seq <= sealed_up_to) has its metadata row. A tombstone
        inserted by hand hid a live item; one removed by hand brought a deleted item's codes
        back and counted it. A join over the tombstones and one count."""
        conn, where = self._conn, self.root / DB_NAME
        hidden = conn.execute(
            "SELECT i.id, t.seq FROM tombstones t JOIN items i ON i.seq = t.seq LIMIT 1"
        ).fetchone()
        if hidden is not None:
            raise IntegrityError(
                f"expected tombstones of deleted rows only in {where}, got one for the live "
                f"item {hidden[0]!r} (seq {hidden[1]})"
            )
        sql = "SELECT count(*) FROM items WHERE seq <= ?"
        (rows,) = conn.execute(sql, (sealed_up_to,)).fetchone()
        if rows != live:
            raise IntegrityError(
                f"expected the {live} live rows of the segments to have metadata rows in "
                f"{where}, got {rows}: a tombstone is missing or a row was removed by hand"
            )

    def _loaded_segment(self, name: str, n_rows: int, crc: int) -> LoadedSegment:
        """The segment `name`: the one already loaded, or read (and checked) from its file."""
        for seg in self._segments:
            if seg.name == name and seg.crc == crc:
                return seg
        path = self.root / SEGMENTS_DIR / name
        try:
            data = read_segment(path, n_bits=self.n_bits, expect_rows=n_rows, expect_crc=crc)
        except InputError:
            # Merged away by another process after our snapshot was taken, before the read or
            # during it: _reload reads a new snapshot. (An exists() check first left the window
            # between it and the read: the two-process crash test hit it.)
            if self.shared and not path.exists():
                raise FileNotFoundError(path) from None
            raise
        return LoadedSegment.of(name, data, crc, self.n_bits)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The writer lock: this process's writes one at a time and, in a shared store, every
        process's (WRITE_LOCK); inside it the in-memory parts are what is committed."""
        with self._lock:
            if self._write_lock_file is None:
                yield
                return
            with exclusive(self._write_lock_file):
                self._reload()
                yield

    def _check_serving(self) -> None:
        """StoreRetired when a version switch retired this store (read under the writer lock,
        so a write of any process either commits before the switch's catch-up or is refused)."""
        if md.get_meta(self._conn, RETIRED_KEY) == "1":
            raise StoreRetired(
                f"the store {self.root} was retired by a version switch: write to the version "
                "now served"
            )

    @contextmanager
    def switching(self) -> Iterator[Callable[[bool], None]]:
        """Hold every writer of this store for the block (this process's and, shared, every
        process's): what a version switch catches up under. The yielded `retire(True)` marks
        the store retired in one commit: from then on its writes raise StoreRetired, in every
        process (`retire(False)` undoes it, for a switch that fails after it)."""
        with self._writing():
            yield self._set_retired

    def reinstate(self) -> None:
        """Take writes again: the store a switch (a rollback) serves once more."""
        with self._writing():
            self._set_retired(False)

    def _set_retired(self, retired: bool) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            md.set_meta(conn, RETIRED_KEY, "1" if retired else "0")
            conn.execute("COMMIT")
        except BaseException:
            self._roll_back()
            raise

    @property
    def retired(self) -> bool:
        """Whether a version switch has retired this store."""
        return md.get_meta(self._reader(), RETIRED_KEY) == "1"

    # ---- reading ---------------------------------------------------------------------------

    def view(self) -> View:
        """The current immutable view (one assignment read; never blocks, except that in a
        shared store it first catches up when another process has committed)."""
        view = self._current_view(wait=True)
        assert view is not None  # a wait for the lock always gets it
        return view

    def _current_view(self, *, wait: bool) -> View | None:
        """view(); with wait=False None instead of waiting for the writer lock to catch up."""
        if self.shared and self._others_committed():
            if not self._lock.acquire(blocking=wait):
                self._seen.version = None  # still behind: this thread's next search catches up
                return None
            try:
                self._reload()
            finally:
                self._lock.release()
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

    @_classified
    def search(
        self,
        target: Target,
        queries: np.ndarray,
        k: int,
        *,
        where: Filter | None = None,
        asymmetric: Asymmetric | None = None,
        radius: int | None = None,
    ) -> Hits:
        """Exact top-k of each (m, n_words) query among live items (that pass `where`), with
        their metadata: the codes of the current view, filtered by store/filters.py. Ranked
        by Hamming distance, or by `asymmetric`'s weighted distance (its signs are `queries`);
        with `radius`, only items within that Hamming distance of the query."""
        check_packed(queries, self.n_bits, name="queries")  # also when no part is searched
        check_k(k)
        if where is not None and where.keeps_all:
            where = None
        ranking = _Ranking(asymmetric, radius)
        for _ in range(SEARCH_ATTEMPTS):
            found = self._search_once(target, queries, k, where, self.view(), ranking)
            if found is not None:
                return found
        # Deletes keep outrunning this search: answer once more with writes held off.
        with self._writing():
            found = self._search_once(target, queries, k, where, self._view, ranking)
        if found is None:
            raise IntegrityError(f"segment rows have no metadata row in {self.root / DB_NAME}")
        return found

    @_classified
    def search_now(
        self,
        target: Target,
        queries: np.ndarray,
        k: int,
        *,
        asymmetric: Asymmetric | None = None,
        radius: int | None = None,
    ) -> Hits | None:
        """search() without a filter, answered on this thread alone and without waiting for a
        lock, or None where that would wait or take long: the view is behind another process's
        commit while this process's writer holds the lock, deletes keep outrunning the search,
        or the scan reads config.inline_max_words of codes or more (half that for an asymmetric
        one). A filtered search has no such form: its cost grows with the rows that pass the
        filter.

        For the event loop (service/api/search.py): a search that waits there stalls every
        connection, and the caller runs search() on a worker thread instead.
        """
        check_packed(queries, self.n_bits, name="queries")
        check_k(k)
        ranking = _Ranking(asymmetric, radius)
        for _ in range(SEARCH_ATTEMPTS):
            view = self._current_view(wait=False)
            # An asymmetric scan costs about twice a Hamming one (docs/search-api.md): half
            # the codes keep the caller's thread held as long.
            most = self.config.inline_max_words // (2 if asymmetric is not None else 1)
            if view is None or view.scan_words(target) >= most:
                return None
            found = self._search_once(target, queries, k, None, view, ranking, one_thread=True)
            if found is not None:
                return found
        return None

    def _search_once(
        self,
        target: Target,
        queries: np.ndarray,
        k: int,
        where: Filter | None,
        view: View,
        ranking: _Ranking,
        *,
        one_thread: bool = False,
    ) -> Hits | None:
        """One search of `view` with its hits' rows, or None if a hit's row is gone."""
        asym, radius = ranking
        if where is None:
            dists, seqs = view.search(
                target, queries, k, one_thread=one_thread, asymmetric=asym, radius=radius
            )
        else:
            dists, seqs = self._filters.search(
                view, target, queries, k, where, self._reader(), asymmetric=asym, radius=radius
            )
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
        if asym is None:
            scores = hamming_scores(dists, self.n_bits)
        else:  # dists are weighted distances: the Hamming ones from the hits' codes
            scores = asym.scores(dists)
            found = seqs >= 0
            codes = view.codes_of(target, seqs[found])
            rows = np.nonzero(found)[0]
            dists = np.zeros_like(dists)
            dists[found] = np.bitwise_count(codes ^ queries[rows]).sum(axis=1)
        hits, kept_scores = [], []
        for row_s, row_d, row_score in zip(
            seqs.tolist(), dists.tolist(), scores.tolist(), strict=True
        ):
            hits.append([(items[s], d) for s, d in zip(row_s, row_d, strict=True) if s >= 0])
            kept_scores.append([v for s, v in zip(row_s, row_score, strict=True) if s >= 0])
        return Hits(hits, view.commit, kept_scores)

    def sample_texts(self, n: int) -> list[str]:
        """The texts of at most n live items spread evenly over insertion order."""
        view = self.view()
        live = [p.seqs if p.live is None else p.seqs[p.live.to_bool()] for p in view.parts]
        seqs = np.concatenate(live) if live else np.empty(0, dtype=np.int64)
        if not seqs.size:
            return []
        picked = seqs[np.unique(np.linspace(0, seqs.size - 1, min(n, seqs.size)).astype(np.int64))]
        rows = md.rows_by_seq(self._reader(), picked.tolist(), self.root / DB_NAME)
        return [item.text for item in rows.values()]

    def scan_plan(
        self, target: Target, where: Filter
    ) -> list[tuple[HammingIndex, LiveMask | None]]:
        """What a search filtered by `where` scans in the current view (an EXPLAIN, for the
        filter benchmark): per part with passing rows, its index and mask, or a gathered index
        of just those rows."""
        return self._filters.parts(self.view(), target, where, self._reader())

    def drop_filter_caches(self) -> None:
        """Forget cached posting lists and selections: the next filtered search is a cold one,
        as after a start."""
        self._filters = FilterIndex(self.config)

    @_classified
    def get(self, item_id: ItemId) -> md.Item | None:
        """The item stored under item_id (5 and "5" alike), or None."""
        row = (
            self._reader()
            .execute(f"SELECT {md.ROW_COLUMNS} FROM items WHERE id = ?", (parse_id(item_id),))
            .fetchone()
        )
        return None if row is None else md.item_from_row(row, self.root / DB_NAME)[1]

    @_classified
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

    @_classified
    def existing(self, ids: Sequence[ItemId]) -> set[ItemId]:
        """Which of ids are stored (as canonical ids)."""
        return md.existing_ids(self._reader(), [parse_id(i) for i in ids])

    # ---- writing ---------------------------------------------------------------------------

    @_classified
    def add(self, batch: NewItems, *, on_conflict: OnConflict = "error") -> int:
        """Commit a batch durably, then serve it; returns the commit number. All or nothing.

        An id already stored is an InputError, or (on_conflict="replace") its item is replaced
        by the new one in the same transaction.
        """
        b = len(batch)
        rows, to_write = checked_rows(batch, self.n_bits)
        with self._writing():
            self._check_serving()
            written: list[str] = []  # image files this batch wrote: removed if it fails
            segment = None
            try:
                # Under the lock: a delete's image clean-up cannot remove a file this add uses.
                for relative, source in to_write.items():
                    if not (self.artifacts / relative).is_file():
                        written.append(relative)
                        put_image(self.artifacts / relative, source, durable=False)
                if written:  # every new name durable before the commit that refers to it
                    fsync_dir(self.artifacts / IMAGES_DIR)
                seqs = np.arange(self._next_seq, self._next_seq + b, dtype=np.int64)
                bulk = b >= self.config.bulk_rows
                if bulk and self._growing.n:
                    self._seal()
                if bulk:  # the codes go to disk before the rows that name them are committed
                    segment = self.write_segment(
                        SegmentData(seqs, batch.image_codes, batch.text_codes)
                    )
            except BaseException:
                self._collect_images(written)
                raise
            added = time.time()
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                replaced: list[tuple[int, str, ItemId]] = []
                if on_conflict == "replace":
                    replaced = self._delete_rows(list(batch.ids))
                insert_rows(conn, rows, seqs.tolist(), added, codes=segment is None)
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
                self._collect_images(list(to_write))  # those no row refers to: this batch's
                raise
            self._forget([r[0] for r in replaced])
            if segment is not None:
                self._segments.append(segment)
            else:
                self._append_growing(seqs, batch.image_codes, batch.text_codes)
            self._publish()
            if self._growing.n >= self.config.seal_rows:
                self._seal()
            self._collect_images([r[1] for r in replaced])
            self._wake_compactor()
            return self._commit

    @_classified
    def delete(self, ids: Sequence[ItemId]) -> Deleted:
        """Delete these ids durably, then stop serving them; the ids that were there and the
        commit that removed them (read under the writer lock: another write's commit never)."""
        with self._writing():
            self._check_serving()
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
            self._publish()
            self._collect_images([g[1] for g in gone])
            self._wake_compactor()
            return Deleted([g[2] for g in gone], self._commit)

    def _delete_rows(self, ids: list[ItemId]) -> list[tuple[int, str, ItemId]]:
        """(seq, image, id) of the rows of ids, deleted in the open transaction (store/rows.py)."""
        return delete_rows(self._conn, ids, sealed_up_to=self._sealed_up_to())

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
            self._growing.without(np.asarray(growing, np.int64))

    def _append_growing(self, seqs: np.ndarray, image: np.ndarray, text: np.ndarray) -> None:
        """Copy committed rows into the growing part, sealing it each time it fills."""
        start = 0
        while start < len(seqs):
            if self._growing.n >= self.config.seal_rows:
                self._seal(publish=False)  # the caller publishes the whole batch
            rest = slice(start, None)
            start += self._growing.append(
                seqs[rest], image[rest], text[rest], up_to=self.config.seal_rows
            )

    def _seal(self, *, publish: bool = True) -> None:
        """Write the growing part's live rows as a segment and record it (writer lock held)."""
        data = self._growing.live_data()
        if len(data):
            segment = self.write_segment(data)
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._record_segment(segment)
                conn.execute("COMMIT")
            except BaseException:
                self._roll_back()
                raise
            self._segments.append(segment)
        self._growing = Growing(self._words, self.config.seal_rows)
        if publish:
            self._publish()
        logger.info("sealed %d growing rows into a segment", len(data))

    def write_segment(self, data: SegmentData) -> LoadedSegment:
        """Write and read back a new segment file of `data`, not yet recorded (no lock needed:
        until a seal or record_merge names it in a commit, the next open removes it)."""
        name = f"seg-{int(data.seqs[0]):016d}-{uuid.uuid4().hex[:8]}.seg"
        crc = write_segment(self.root / SEGMENTS_DIR / name, n_bits=self.n_bits, data=data)
        loaded = read_segment(
            self.root / SEGMENTS_DIR / name,
            n_bits=self.n_bits,
            expect_rows=len(data),
            expect_crc=crc,
        )
        return LoadedSegment.of(name, loaded, crc, self.n_bits)

    # ---- compaction (the policy and the merging thread are store/compaction.py's) ---------

    def plan_merge(
        self, choose: Callable[[list[LoadedSegment]], list[LoadedSegment] | None]
    ) -> Merge | None:
        """The segments `choose` picks among the current ones (in seq order), with their masks
        as they are now; None when it picks none."""
        with self._writing():
            chosen = choose(list(self._segments))
            return Merge(tuple(chosen), tuple(s.mask for s in chosen)) if chosen else None

    def record_merge(self, merge: Merge, new: LoadedSegment | None, dropped: np.ndarray) -> None:
        """Swap the merge's segments for `new` (None: no row of theirs was live), in one commit
        that also drops the tombstones of `dropped` (the rows the merge left out), then publish
        and remove the old files. Rows deleted while the merge ran stay masked in `new`."""
        names = [s.name for s in merge.segments]
        with self._writing():
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("DELETE FROM segments WHERE name = ?", [(n,) for n in names])
                conn.executemany(
                    "DELETE FROM tombstones WHERE seq = ?", [(int(s),) for s in dropped]
                )
                if new is not None:
                    self._record_segment(new)
                else:
                    self.bump_layout()
                conn.execute("COMMIT")
            except BaseException:
                self._roll_back()
                if new is not None:
                    (self.root / SEGMENTS_DIR / new.name).unlink(missing_ok=True)
                raise
            if new is not None:
                new.mask = deleted_meanwhile(merge, new)
            first = next(i for i, s in enumerate(self._segments) if s is merge.segments[0])
            self._segments[first : first + len(names)] = [new] if new is not None else []
            self._publish()
        for name in names:
            (self.root / SEGMENTS_DIR / name).unlink(missing_ok=True)

    def _record_segment(self, seg: LoadedSegment) -> None:
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
        if conn.in_transaction:  # SQLite ends it itself on some errors (SQLITE_FULL among them)
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
