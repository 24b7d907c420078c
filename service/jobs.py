"""Background build jobs: one worker thread runs them in order; every job's record is on disk.

A 202 means the job will reach an outcome that GET /v1/jobs/{id} can read back:
- the record is committed (SQLite, WAL, synchronous=FULL) before the job id is returned;
- queued and running jobs are never forgotten; only finished ones past `keep` are, oldest first;
- a restart reads each job as it was left: a finished one as it finished, one that was queued or
  running as failed, INTERRUPTED (a dataset build keeps the pairs it committed, so running it
  again resumes it);
- at most `max_queued` jobs wait to run: one more is refused (QueueFull, a 429) before it is
  accepted, so the queue's memory (each items job holds its decoded request) stays bounded.
Progress (done / total) is kept in memory only: it says nothing once the process is gone.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import ValidationError

from common.errors import InputError, IntegrityError
from service.errors import printable
from service.schemas import ErrorItem, JobStatus

logger = logging.getLogger(__name__)

JOBS_NAME = "jobs.sqlite"  # in the artifacts folder, next to the store
INTERRUPTED = "interrupted by a restart"
Progress = Callable[[int, int], None]
Work = Callable[[Progress], JobStatus]

_SCHEMA = "CREATE TABLE IF NOT EXISTS jobs (seq INTEGER PRIMARY KEY, id TEXT UNIQUE, record TEXT)"


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
    """Runs jobs one at a time in a worker thread; their records live in a SQLite file."""

    def __init__(self, path: Path, *, keep: int = 1000, max_queued: int = 32) -> None:
        self.path = path
        self.keep = keep
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self._jobs: dict[str, JobStatus] = {}  # in submission order
        try:
            # One connection, used under self._lock from request threads and the worker.
            self._db = sqlite3.connect(path, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
            rows = self._db.execute("SELECT id, record FROM jobs ORDER BY seq").fetchall()
            for job_id, record in rows:
                self._jobs[job_id] = JobStatus.model_validate_json(record)
        except (sqlite3.DatabaseError, ValidationError) as err:
            raise IntegrityError(
                f"the job records in {path} cannot be read ({str(err).splitlines()[0]}); move "
                "the file away to start without them"
            ) from None
        interrupted = [j for j, s in self._jobs.items() if s.status in ("queued", "running")]
        with self._lock, self._db:
            for job_id in interrupted:
                self._save(
                    self._jobs[job_id].model_copy(
                        update={"status": "failed", "detail": INTERRUPTED}
                    )
                )
            self._evict()
        if interrupted:
            logger.warning("%d build jobs were interrupted by a restart", len(interrupted))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="build-job")

    def submit(self, total: int, work: Work) -> str:
        """Queue `work(progress)`, which reports (done, total) and returns the final status.

        The job's record is durable when this returns; QueueFull when max_queued already wait.
        """
        job_id = uuid.uuid4().hex
        status = JobStatus(job_id=job_id, status="queued", done=0, total=total)
        with self._lock:
            waiting = sum(s.status == "queued" for s in self._jobs.values())
            if waiting >= self.max_queued:
                raise QueueFull(
                    f"expected at most {self.max_queued} queued builds, got one more: retry "
                    "when one has finished"
                )
            self._jobs[job_id] = status
            with self._db:
                self._db.execute(
                    "INSERT INTO jobs (id, record) VALUES (?, ?)",
                    (job_id, status.model_dump_json()),
                )
        self._pool.submit(self._run, job_id, work)
        return job_id

    def get(self, job_id: str) -> JobStatus | None:
        """The job's current status, or None for an unknown (or long finished) id."""
        with self._lock:
            return self._jobs.get(job_id)

    def _save(self, status: JobStatus) -> None:
        """Replace a job's record in memory and on disk (the caller holds the lock)."""
        status = _printable(status)
        self._jobs[status.job_id] = status
        self._db.execute(
            "UPDATE jobs SET record = ? WHERE id = ?", (status.model_dump_json(), status.job_id)
        )

    def _evict(self) -> None:
        """Forget the oldest finished jobs past `keep` (the caller holds the lock)."""
        finished = [j for j, s in self._jobs.items() if s.status in ("succeeded", "failed")]
        for job_id in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job_id]
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def _change(self, job_id: str, **changes: object) -> None:
        """Change a job's record durably, then forget finished jobs past `keep`."""
        with self._lock, self._db:
            self._save(self._jobs[job_id].model_copy(update=changes))
            self._evict()

    def _progress(self, job_id: str, done: int, total: int) -> None:
        with self._lock:  # in memory only: a restart reads the job as interrupted anyway
            self._jobs[job_id] = self._jobs[job_id].model_copy(
                update={"done": done, "total": total}
            )

    def _run(self, job_id: str, work: Work) -> None:
        self._change(job_id, status="running")
        try:
            final = work(lambda done, total: self._progress(job_id, done, total))
        except InputError as err:
            errors: list[ErrorItem] = list(getattr(err, "errors", []))
            self._change(job_id, status="failed", detail=str(err), errors=errors)
            logger.info("job %s failed: %s", job_id, err)
            return
        except Exception as err:  # a bug: logged once here, reported to the client as failed
            logger.exception("job %s crashed", job_id)
            self._change(job_id, status="failed", detail=f"internal error: {type(err).__name__}")
            return
        self._change(
            job_id,
            **{name: getattr(final, name) for name in JobStatus.model_fields if name != "job_id"},
        )

    def close(self) -> None:
        """Finish the running job and stop; jobs still queued read as interrupted next start."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._db.close()
