"""Builds: validate a batch (or a dataset root) now, index it in a background job; job status."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request

from common.errors import InputError
from models.data.loaders import load_dataset
from service.api.deps import (
    ERRORS,
    JobsDep,
    KeyFirst,
    LoadedDep,
    MetricsDep,
    ServingDep,
    SettingsDep,
    require_key,
)
from service.errors import printable
from service.indexing import Pending, succeeded
from service.jobs import JobProgress
from service.schemas import BuildRequest, ErrorBody, JobAccepted, JobStatus
from service.state import Loaded
from service.uploads import folder_inside

router = APIRouter(tags=["index"], route_class=KeyFirst)

BUSY: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorBody,
        "description": "too many builds queued: retry after the Retry-After seconds",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    }
}


@router.post(
    "/v1/index/build",
    status_code=202,
    responses={**ERRORS, **BUSY},
    dependencies=[Depends(require_key)],
)
def build_index(
    body: BuildRequest,
    request: Request,
    loaded: LoadedDep,
    serving: ServingDep,
    settings: SettingsDep,
    jobs: JobsDep,
    metrics: MetricsDep,
) -> JobAccepted:
    """Validate a batch (or a dataset root) now, then index it in a background job.

    A 202 means the job's record is durable: its status URL gives its outcome, across restarts.
    """
    pending: list[Pending] = []
    indexer = loaded.indexer
    on_conflict = body.on_conflict or ("error" if body.items is not None else "skip")
    skipped: list[str] = []
    if body.items is not None:  # items are checked now: a bad batch is a 400 listing each item
        if len(body.items) > settings.max_batch_items:
            raise InputError(
                f"expected at most {settings.max_batch_items} items, got {len(body.items)}"
            )
        pending, skipped = indexer.validate_items(
            body.items,
            data_dir=settings.server_data_dir,
            max_image_bytes=settings.max_upload_bytes,
            on_conflict=on_conflict,
        )
    dataset, data_dir, root = body.dataset, settings.server_data_dir, None
    if dataset is not None:  # the root is checked now; its records are read in the job
        if data_dir is None:
            raise InputError("expected CMH_SERVER_DATA_DIR to be set for dataset builds")
        root = folder_inside(data_dir, dataset.root, what="dataset root")

    def work(progress: JobProgress) -> JobStatus:
        attempts: list[str] = []  # the versions this job started writing to (Serving.write)

        def add_dataset(at: Loaded) -> tuple[int, list[str], int]:
            # Run again on the new version after a switch: what this job added before it was
            # copied there, so "error" would refuse the job's own items: they are skipped
            # (and said so) instead.
            attempts.append(at.version)
            again = len(attempts) > 1 and on_conflict == "error"
            assert dataset is not None and root is not None
            outcome = at.indexer.add_dataset(
                load_dataset(dataset.name, root),
                progress,
                on_conflict="skip" if again else on_conflict,
                within=data_dir,
                journal=progress,
            )
            return outcome.added, outcome.skipped, outcome.commit

        def add_items(at: Loaded) -> int:  # encoded again, with the new model, after a switch
            return at.indexer.add(pending, progress, on_conflict=on_conflict, journal=progress)

        if dataset is not None:
            added, not_added, commit = serving.write(add_dataset)
        else:
            if pending:
                commit = serving.write(add_items)
            else:  # every item skipped as already indexed: nothing to write
                commit = serving.current().store.view().commit
            added, not_added = len(pending), skipped
        store = serving.current().store
        metrics.set_index_size(len(store), len(store))
        return succeeded(added, not_added, commit)

    job_id = jobs.submit(len(pending), work)
    return JobAccepted(job_id=job_id, status_url=str(request.url_for("job_status", job_id=job_id)))


@router.get("/v1/jobs/{job_id}", responses=ERRORS, name="job_status")
def job_status(job_id: str, jobs: JobsDep) -> JobStatus:
    """A build job's status, progress (done / total), per-item errors and skipped pairs."""
    status = jobs.get(job_id)
    if status is None:
        raise HTTPException(404, f"expected a known job id, got {printable(job_id[:80])!r}")
    return status
