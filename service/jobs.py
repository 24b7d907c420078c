"""Background build jobs: one worker thread runs them in order; their status is kept in memory."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from common.errors import InputError
from service.schemas import ErrorItem, JobStatus

logger = logging.getLogger(__name__)

MAX_KEPT = 1000  # finished jobs remembered for GET /v1/jobs/{id}


class JobManager:
    """Runs jobs one at a time in a worker thread and reports their status and progress."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="build-job")
        self._jobs: dict[str, JobStatus] = {}
        self._lock = threading.Lock()

    def submit(self, total: int, work: Callable[[Callable[[int, int], None]], JobStatus]) -> str:
        """Queue `work(progress)`, which reports (done, total) and returns the final status."""
        job_id = uuid.uuid4().hex
        with self._lock:
            self._jobs[job_id] = JobStatus(job_id=job_id, status="queued", done=0, total=total)
            while len(self._jobs) > MAX_KEPT:
                self._jobs.pop(next(iter(self._jobs)))
        self._pool.submit(self._run, job_id, work)
        return job_id

    def get(self, job_id: str) -> JobStatus | None:
        """The job's current status, or None for an unknown id."""
        with self._lock:
            return self._jobs.get(job_id)

    def _update(self, job_id: str, **changes: object) -> None:
        with self._lock:
            self._jobs[job_id] = self._jobs[job_id].model_copy(update=changes)

    def _run(self, job_id: str, work: Callable[[Callable[[int, int], None]], JobStatus]) -> None:
        self._update(job_id, status="running")
        try:
            final = work(lambda done, total: self._update(job_id, done=done, total=total))
        except InputError as err:
            errors: list[ErrorItem] = list(getattr(err, "errors", []))
            self._update(job_id, status="failed", detail=str(err), errors=errors)
            logger.info("job %s failed: %s", job_id, err)
            return
        except Exception as err:  # a bug: logged once here, reported to the client as failed
            logger.exception("job %s crashed", job_id)
            self._update(job_id, status="failed", detail=f"internal error: {type(err).__name__}")
            return
        self._update(job_id, **final.model_dump(exclude={"job_id"}))

    def close(self) -> None:
        """Finish the running job and stop."""
        self._pool.shutdown(wait=True, cancel_futures=True)
