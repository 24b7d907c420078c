"""Background build jobs: one worker thread per process runs them in order; every record is on disk.

A 202 means the job will reach an outcome that GET /v1/jobs/{id} can read back:
- the record is committed (SQLite, WAL, synchronous=FULL) before the job id is returned;
- queued and running jobs are never forgotten; only finished ones past `keep` are, oldest first;
- a job whose process is gone reads as it was left: a finished one as it finished, one that was
  queued or running as failed, INTERRUPTED (a dataset build keeps the pairs it committed, so
  running it again resumes it);
- what a job reports matches what the store holds: before each batch is committed to the store
  the job durably notes the batch (its ids and a digest of each item's content) and the outcome
  it will report if that batch is its last; after the commit it notes the items added. A job
  that died, or whose store call failed, between the two (kill -9, a Milvus that stopped
  answering after it took the batch) is settled by asking the store which of those items it
  holds as given: all of a last batch reads as the job's success; otherwise it reads failed,
  with `added` counting what was committed and `committed` naming that batch's committed ids;
- at most `max_queued` jobs wait to run in one process: one more is refused (QueueFull, a 429)
  before it is accepted, so the queue's memory (each items job holds its decoded request) stays
  bounded.

Several server processes (`cmh serve --workers N`) share one job file: each runs the jobs it
accepted and answers for every job from the file. A process owns its jobs through an exclusive
flock on a file named after it in jobs.owners/, which the kernel releases when the process dies
(kill -9 included): a starting process marks as interrupted only the jobs whose owner's lock it
can take, never those of a live neighbour (a pid could have been reused; a lock cannot lie).
Progress (done / total) is written at most once per PROGRESS_EVERY_S, for the other processes.

Over 400 lines because the records, the owners' locks and the settling of a noted batch keep
the one promise above: a 202 reaches an outcome that can be read back.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from common.errors import BackendError, InputError, IntegrityError, NoSpaceError, is_no_space
from service.errors import printable
from service.schemas import ErrorItem, JobStatus
from store.ids import ItemId

logger = logging.getLogger(__name__)

JOBS_NAME = "jobs.sqlite"  # in the artifacts folder, next to the store
OWNERS_NAME = "jobs.owners"  # beside it: one flocked file per live process that owns jobs
INTERRUPTED = "interrupted by a restart"
PROGRESS_EVERY_S = 1.0  # how often a running job's progress reaches the file (other processes)
Progress = Callable[[int, int], None]
Entry = tuple[ItemId, str]  # an item of a batch about to be committed: its id and content digest
Reconcile = Callable[[list[Entry]], list[ItemId]]  # the entries the store holds as given

_SCHEMA = "CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY, id TEXT UNIQUE, record TEXT)"
OWNER_NAME = re.compile(r"[0-9a-f]{32}")
_STATUS = "json_extract(record, '$.status')"


class JobInterrupted(Exception):
    """The job stopped between two batches because its server is shutting down: it reads as
    INTERRUPTED, with what it committed before (a dataset build resumes when run again)."""


class JobProgress:
    """What a job's work reports: progress (call it with done, total), and each batch it
    commits to the store, before (`committing`) and after (`committed`)."""

    def __init__(self, manager: JobManager, job_id: str) -> None:
        self._manager = manager
        self._job_id = job_id

    def __call__(self, done: int, total: int) -> None:
        self._manager._progress(self._job_id, done, total)

    def committing(self, entries: list[Entry], *, final: JobStatus | None = None) -> None:
        """Durably note a batch about to be committed, and `final`, the job's outcome should
        this batch be its last and be found committed."""
        self._manager._note(self._job_id, entries, final)

    def committed(self, added: int, commit: int) -> None:
        """Durably note that the noted batch is committed: `added` items so far, at `commit`."""
        self._manager._committed(self._job_id, added, commit)

    def stopping(self) -> bool:
        """Whether the server is shutting down: the work should stop at its next batch's end
        (raising JobInterrupted) rather than run to its end."""
        return self._manager._stopping.is_set()


Work = Callable[[JobProgress], JobStatus]


class QueueFull(RuntimeError):
    """Too many builds are waiting: the client should retry later (429)."""


def _printable(status: JobStatus) -> JobStatus:
    """The status with every text encodable as UTF-8 (file names can hold lone surrogates)."""
    return status.model_copy(
        update={
            "detail": printable(status.detail),
            "skipped": [printable(s) for s in status.skipped],
            "errors": [e.model_copy(update={"reason": printable(e.reason)}) for e in status.errors],
        }
    )


class JobManager:
    """Runs this process's jobs one at a time in a worker thread; all records live in SQLite."""

    def __init__(
        self,
        path: Path,
        *,
        keep: int = 1000,
        max_queued: int = 32,
        reconcile: Reconcile | None = None,
    ) -> None:
        self.path = path
        self.keep = keep
        self.max_queued = max_queued
        self._reconcile = reconcile  # None: noted batches are not checked (the job just fails)
        self._lock = threading.Lock()
        self._mine: dict[str, JobStatus] = {}  # this process's queued and running jobs
        self._saved_at: dict[str, float] = {}  # when each one's progress was last written
        self._noted: set[str] = set()  # this process's jobs with a batch noted, not committed
        self._stopping = threading.Event()  # set by close(): running work stops between batches
        self._owner = uuid.uuid4().hex
        owners = path.parent / OWNERS_NAME
        owners.mkdir(exist_ok=True)
        self._owner_fd = hold_owner_file(owners, self._owner)
        try:
            # One connection, used under self._lock from request threads and the worker;
            # transactions are explicit (BEGIN IMMEDIATE), so processes take turns to write.
            self._db = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            with self._lock, self._write():
                self._db.execute(_SCHEMA)
                columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
                if "owner" not in columns:  # a file from before jobs had owners
                    self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
                if "batch" not in columns:  # a file from before jobs noted their batches
                    self._db.execute("ALTER TABLE jobs ADD COLUMN batch TEXT")
                interrupted = self._interrupt_orphans(owners)
                self._evict()
        except (sqlite3.DatabaseError, ValidationError) as err:
            os.close(self._owner_fd)
            raise IntegrityError(
                f"the job records in {path} cannot be read ({str(err).splitlines()[0]}); move "
                "the file away to start without them"
            ) from None
        if interrupted:
            logger.warning("%d build jobs were interrupted by a restart", interrupted)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="build-job")

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction (the caller holds self._lock); a full device is a
        NoSpaceError (a 507 for the request that asked, the job's failure for a job)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._db.in_transaction:  # SQLite ends it itself on SQLITE_FULL
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as err:
            if not is_no_space(err):
                raise
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise NoSpaceError(
                f"no space left on the device holding {self.path}: the job record was not "
                "changed; free some space and retry"
            ) from err

    def _interrupt_orphans(self, owners: Path) -> int:
        """Mark the unfinished jobs of every dead owner failed, INTERRUPTED; drop its lock file.

        Runs in a write transaction, so two processes starting at once do this in turn.
        """
        dead: set[str | None] = {None}  # no owner: a record from before owners
        for file in owners.iterdir():
            if file.name != self._owner and owner_is_dead(file):
                dead.add(file.name)
        rows = self._db.execute(
            f"SELECT id, record, owner, batch FROM jobs WHERE {_STATUS} IN ('queued', 'running')"
        ).fetchall()
        count = 0
        for _, record, owner, batch in rows:
            if owner in dead or not (owners / owner).exists():
                status = JobStatus.model_validate_json(record)
                self._save(self._settled(status, batch, INTERRUPTED))
                count += 1
        for name in dead - {None}:
            (owners / str(name)).unlink(missing_ok=True)
        return count

    def _settled(self, status: JobStatus, batch: str | None, why: str) -> JobStatus:
        """The outcome of a job that stopped (`why`) with `batch` noted and not known committed:
        what the store holds of it decides (see the module docstring)."""
        failed = status.model_copy(update={"status": "failed", "detail": why})
        if batch is None or self._reconcile is None:
            return failed
        noted = json.loads(batch)
        entries: list[Entry] = [(item_id, digest) for item_id, digest in noted["entries"]]
        try:
            committed = self._reconcile(entries)
        except Exception as err:  # the store cannot answer either: say what is not known
            logger.warning("job %s: its last batch could not be checked: %s", status.job_id, err)
            return failed.model_copy(
                update={
                    "detail": f"{why}; whether its last batch of {len(entries)} items was "
                    f"committed could not be checked ({type(err).__name__})"
                }
            )
        if len(committed) == len(entries) and noted["final"] is not None:
            final = JobStatus.model_validate(noted["final"])
            return final.model_copy(update={"job_id": status.job_id})
        return failed.model_copy(
            update={"added": status.added + len(committed), "committed": committed}
        )

    def reconcile_with(self, reconcile: Reconcile) -> None:
        """Settle stopped jobs against another store from now on (the version served now)."""
        self._reconcile = reconcile

    def submit(self, total: int, work: Work) -> str:
        """Queue `work(progress)`, which reports (done, total) and returns the final status.

        The job's record is durable when this returns; QueueFull when max_queued already wait.
        """
        job_id = uuid.uuid4().hex
        status = JobStatus(job_id=job_id, status="queued", done=0, total=total)
        with self._lock:
            waiting = sum(s.status == "queued" for s in self._mine.values())
            if waiting >= self.max_queued:
                raise QueueFull(
                    f"expected at most {self.max_queued} queued builds, got one more: retry "
                    "when one has finished"
                )
            with self._write():
                self._db.execute(
                    "INSERT INTO jobs (id, record, owner) VALUES (?, ?, ?)",
                    (job_id, status.model_dump_json(), self._owner),
                )
            self._mine[job_id] = status
        self._pool.submit(self._run, job_id, work)
        return job_id

    def get(self, job_id: str) -> JobStatus | None:
        """The job's current status, or None for an unknown (or long finished) id."""
        with self._lock:
            mine = self._mine.get(job_id)
            if mine is not None:  # its progress, as of now
                return mine
            row = self._db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobStatus.model_validate_json(row[0])

    def _save(self, status: JobStatus) -> None:
        """Replace a job's record on disk, and in memory while it is this process's and
        unfinished (the caller holds the lock, in a write transaction)."""
        status = _printable(status)
        if status.job_id in self._mine:
            if status.status in ("queued", "running"):
                self._mine[status.job_id] = status
            else:
                del self._mine[status.job_id]
                self._saved_at.pop(status.job_id, None)
        self._db.execute(
            "UPDATE jobs SET record = ? WHERE id = ?", (status.model_dump_json(), status.job_id)
        )

    def _evict(self) -> None:
        """Forget the oldest finished jobs past `keep` (the caller holds the lock, in a write
        transaction)."""
        self._db.execute(
            f"DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE {_STATUS} IN "
            "('succeeded', 'failed') ORDER BY seq DESC LIMIT -1 OFFSET ?)",
            (self.keep,),
        )

    def _change(self, job_id: str, **changes: object) -> None:
        """Change a job's record durably, then forget finished jobs past `keep`."""
        with self._lock, self._write():
            self._save(self._mine[job_id].model_copy(update=changes))
            self._evict()

    def _progress(self, job_id: str, done: int, total: int) -> None:
        with self._lock:  # durability does not matter: a restart reads the job as interrupted
            status = self._mine[job_id].model_copy(update={"done": done, "total": total})
            self._mine[job_id] = status
            now = time.monotonic()
            if now - self._saved_at.get(job_id, -PROGRESS_EVERY_S) >= PROGRESS_EVERY_S:
                self._saved_at[job_id] = now
                with self._write():
                    self._save(status)

    def _note(self, job_id: str, entries: list[Entry], final: JobStatus | None) -> None:
        noted = {
            "entries": entries,
            "final": None if final is None else _printable(final).model_dump(mode="json"),
        }
        with self._lock, self._write():
            self._db.execute("UPDATE jobs SET batch = ? WHERE id = ?", (json.dumps(noted), job_id))
            self._noted.add(job_id)

    def _committed(self, job_id: str, added: int, commit: int) -> None:
        with self._lock, self._write():
            status = self._mine[job_id].model_copy(update={"added": added, "commit": str(commit)})
            self._save(status)
            self._db.execute("UPDATE jobs SET batch = NULL WHERE id = ?", (job_id,))
            self._noted.discard(job_id)

    def _failed(self, job_id: str, detail: str, errors: list[ErrorItem]) -> None:
        """Record a job's failure; a batch noted and not known committed is settled first."""
        with self._lock:
            row = self._db.execute("SELECT batch FROM jobs WHERE id = ?", (job_id,)).fetchone()
        batch = row[0] if row is not None and job_id in self._noted else None
        status = self._mine[job_id].model_copy(update={"errors": errors})
        self._finish(self._settled(status, batch, detail))

    def _finish(self, final: JobStatus) -> None:
        """Record a job's outcome. Where the device is full it is kept in memory instead, and
        served from there (a restart would read the job as interrupted)."""
        try:
            with self._lock, self._write():
                self._save(final)
                self._db.execute("UPDATE jobs SET batch = NULL WHERE id = ?", (final.job_id,))
                self._evict()
        except NoSpaceError as err:
            logger.error("job %s: %s; its outcome is kept in memory only", final.job_id, err)
            with self._lock:
                self._mine[final.job_id] = _printable(final)
        self._noted.discard(final.job_id)

    def _run(self, job_id: str, work: Work) -> None:
        try:
            self._change(job_id, status="running")
            final = work(JobProgress(self, job_id))
        except JobInterrupted as err:
            logger.info("job %s stopped for the shutdown: %s", job_id, err)
            self._failed(job_id, INTERRUPTED, [])
            return
        except (InputError, NoSpaceError, IntegrityError, BackendError) as err:  # said to clients
            logger.info("job %s failed: %s", job_id, err)
            self._failed(job_id, str(err), list(getattr(err, "errors", [])))
            return
        except Exception as err:  # a bug: logged once here, reported to the client as failed
            logger.exception("job %s crashed", job_id)
            self._failed(job_id, f"internal error: {type(err).__name__}", [])
            return
        changes = {
            name: getattr(final, name) for name in JobStatus.model_fields if name != "job_id"
        }
        self._finish(self._mine[job_id].model_copy(update=changes))

    def close(self) -> None:
        """Stop the running job at its next batch's end (a dataset build: at most FEATURE_BATCH
        images and a commit away) and stop; it and the jobs still queued read as interrupted."""
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            unfinished = [s for s in self._mine.values() if s.status in ("queued", "running")]
            try:
                with self._write():
                    for status in unfinished:
                        self._save(
                            status.model_copy(update={"status": "failed", "detail": INTERRUPTED})
                        )
            except NoSpaceError as err:  # the next start reads them as interrupted all the same
                logger.error("%s", err)
            self._db.close()
            (self.path.parent / OWNERS_NAME / self._owner).unlink(missing_ok=True)
            os.close(self._owner_fd)


def hold_owner_file(owners: Path, name: str) -> int:
    """Create owners/name, locked (an exclusive flock held for as long as this process lives).

    The file is created and locked under a temporary name, then renamed: a file with an owner's
    name is never there unlocked, so a neighbour starting at that instant cannot take it for a
    dead owner's, remove it, and later read this process's jobs as interrupted. A neighbour may
    remove the temporary file before it is locked: the rename then fails and this tries again.
    """
    while True:
        temporary = owners / f"{name}.{uuid.uuid4().hex[:8]}.new"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.rename(temporary, owners / name)
        except FileNotFoundError:
            os.close(fd)
            continue
        return fd


def owner_is_dead(path: Path) -> bool:
    """Whether the process that owned `path` is gone (its lock can be taken); a name that is
    not an owner's is treated as dead, so it is cleaned up."""
    if not OWNER_NAME.fullmatch(path.name):
        return True
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock again, if it was taken
    return True
