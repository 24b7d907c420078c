"""The HTTP endpoints. Those that compute are plain `def` (FastAPI's threadpool runs them), so the
event loop never blocks on torch or NumPy."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.errors import InputError, NotReadyError
from service.builder import Pending, Served, decode_image
from service.jobs import JobManager
from service.metrics import Metrics
from service.schemas import (
    BuildRequest,
    DeleteResponse,
    ErrorBody,
    Hit,
    IndexStats,
    JobAccepted,
    JobStatus,
    SearchResponse,
    Target,
    TextSearch,
)
from service.settings import Settings
from service.store import Snapshot

router = APIRouter()
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody},
    401: {"model": ErrorBody},
    404: {"model": ErrorBody},
    413: {"model": ErrorBody},
    415: {"model": ErrorBody},
    503: {"model": ErrorBody},
}


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings  # type: ignore[no-any-return]


def get_served(request: Request) -> Served:
    """The served model and indexes; NotReadyError (503) before lifespan has loaded them."""
    served = getattr(request.app.state, "served", None)
    if served is None:
        raise NotReadyError("the model and index are not loaded yet")
    return served  # type: ignore[no-any-return]


def get_metrics(request: Request) -> Metrics:
    """The app's metrics."""
    return request.app.state.metrics  # type: ignore[no-any-return]


def get_jobs(request: Request) -> JobManager:
    """The build job manager."""
    return request.app.state.jobs  # type: ignore[no-any-return]


def require_key(
    settings: Annotated[Settings, Depends(get_settings)],
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """When an API key is configured, the X-API-Key header must carry it (else 401)."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value()
    if x_api_key is None or not secrets.compare_digest(x_api_key.encode(), expected.encode()):
        raise HTTPException(401, "expected a valid X-API-Key header for this endpoint")


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServedDep = Annotated[Served, Depends(get_served)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]


def check_k(k: int, settings: Settings) -> None:
    """k must be within the server's bound."""
    if not 1 <= k <= settings.max_k:
        raise InputError(f"expected k in 1..{settings.max_k}, got {k}")


def ranked(snapshot: Snapshot, dists: list[int], ids: list[int]) -> list[Hit]:
    """Hits with metadata, dropping the -1 padding of a k larger than the index."""
    hits = []
    for dist, item_id in zip(dists, ids, strict=True):
        if item_id < 0:
            break
        item = snapshot.items[item_id]
        hits.append(
            Hit(id=item_id, distance=dist, text=item.text, image_url=f"/v1/items/{item_id}/image")
        )
    return hits


@router.post("/v1/search/text", responses=ERRORS, tags=["search"])
def search_text(
    body: TextSearch, served: ServedDep, settings: SettingsDep, metrics: MetricsDep
) -> SearchResponse:
    """Search the image (or text) index with a text."""
    check_k(body.k, settings)
    snapshot = served.snapshot  # one generation for the whole request
    start = time.perf_counter()
    code, unknown = served.encoder.encode_texts([body.text])
    metrics.encode.labels("text").observe(time.perf_counter() - start)
    index = snapshot.image_index if body.target == "image" else snapshot.text_index
    dists, ids = index.search(code, body.k)
    return SearchResponse(
        target=body.target,
        k=body.k,
        n_bits=served.encoder.n_bits,
        generation=snapshot.generation,
        no_known_words=bool(unknown[0]),
        hits=ranked(snapshot, dists[0].tolist(), ids[0].tolist()),
    )


@router.post("/v1/search/image", responses=ERRORS, tags=["search"])
def search_image(
    served: ServedDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    file: Annotated[UploadFile, File(description="a JPEG, PNG, WebP, GIF, BMP or TIFF image")],
    k: Annotated[int, Form(ge=1)] = 10,
    target: Annotated[Target, Form()] = "text",
) -> SearchResponse:
    """Search the text (or image) index with an uploaded image."""
    check_k(k, settings)
    if not (file.content_type or "").startswith("image/"):
        raise HTTPException(415, f"expected an image/* upload, got {file.content_type!r}")
    data = file.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"expected an image of at most {settings.max_upload_bytes} bytes")
    image, _ = decode_image(data, max_pixels=settings.max_image_pixels)
    snapshot = served.snapshot
    start = time.perf_counter()
    code = served.encoder.encode_image(image)
    metrics.encode.labels("image").observe(time.perf_counter() - start)
    index = snapshot.text_index if target == "text" else snapshot.image_index
    dists, ids = index.search(code, k)
    return SearchResponse(
        target=target,
        k=k,
        n_bits=served.encoder.n_bits,
        generation=snapshot.generation,
        hits=ranked(snapshot, dists[0].tolist(), ids[0].tolist()),
    )


@router.post(
    "/v1/index/build",
    status_code=202,
    responses=ERRORS,
    tags=["index"],
    dependencies=[Depends(require_key)],
)
def build_index(
    body: BuildRequest,
    request: Request,
    served: ServedDep,
    settings: SettingsDep,
    jobs: JobsDep,
    metrics: MetricsDep,
) -> JobAccepted:
    """Validate a batch (or a dataset root) now, then index it in a background job."""
    pending: list[Pending] = []
    if body.items is not None:  # items are checked now: a bad batch is a 400 listing each item
        if len(body.items) > settings.max_batch_items:
            raise InputError(
                f"expected at most {settings.max_batch_items} items, got {len(body.items)}"
            )
        pending = served.validate_items(
            body.items, data_dir=settings.server_data_dir, max_image_bytes=settings.max_upload_bytes
        )
    dataset = body.dataset

    def work(progress: Callable[[int, int], None]) -> JobStatus:
        todo, skipped = pending, list[str]()
        if dataset is not None:  # a dataset is read and checked in the job: it can be large
            todo, skipped = served.validate_dataset(
                dataset, data_dir=settings.server_data_dir, max_items=settings.max_batch_items
            )
            progress(0, len(todo))
        snapshot = served.add(todo, progress)
        metrics.set_index_size(len(snapshot.image_index), len(snapshot.text_index))
        return JobStatus(
            job_id="",
            status="succeeded",
            done=len(todo),
            total=len(todo),
            added=len(todo),
            skipped=skipped,
            generation=snapshot.generation,
        )

    job_id = jobs.submit(len(pending), work)
    return JobAccepted(job_id=job_id, status_url=str(request.url_for("job_status", job_id=job_id)))


@router.get("/v1/jobs/{job_id}", responses=ERRORS, tags=["index"], name="job_status")
def job_status(job_id: str, jobs: JobsDep) -> JobStatus:
    """A build job's status, progress (done / total) and per-item errors."""
    status = jobs.get(job_id)
    if status is None:
        raise HTTPException(404, f"expected a known job id, got {job_id!r}")
    return status


@router.delete(
    "/v1/items/{item_id}", responses=ERRORS, tags=["index"], dependencies=[Depends(require_key)]
)
def delete_item(item_id: int, served: ServedDep, metrics: MetricsDep) -> DeleteResponse:
    """Remove an item from both indexes (persisted before it is served)."""
    removed, snapshot = served.delete(item_id)
    if not removed:
        raise HTTPException(404, f"expected an indexed id, got {item_id}")
    metrics.set_index_size(len(snapshot.image_index), len(snapshot.text_index))
    return DeleteResponse(id=item_id, removed=True, generation=snapshot.generation)


@router.get("/v1/items/{item_id}/image", responses=ERRORS, tags=["index"])
def item_image(item_id: int, served: ServedDep) -> FileResponse:
    """The stored image of an indexed item (only files the index refers to are ever served)."""
    item = served.snapshot.items.get(item_id)
    if item is None:
        raise HTTPException(404, f"expected an indexed id, got {item_id}")
    path = served.artifacts / item.image
    if not path.is_file():
        raise HTTPException(404, f"the image of item {item_id} is missing from the artifacts")
    return FileResponse(path)


@router.get("/v1/index/stats", responses=ERRORS, tags=["index"])
def index_stats(served: ServedDep) -> IndexStats:
    """What is being served: sizes, bits, generation, backbone and vocabulary."""
    snap, enc = served.snapshot, served.encoder
    return IndexStats(
        items=len(snap.items),
        n_bits=enc.n_bits,
        generation=snap.generation,
        image_backbone=enc.backbone.name,
        checkpoint_dataset=enc.checkpoint.dataset,
        vocabulary_size=enc.vectorizer.dim,
        device=str(enc.backbone.device),
    )


@router.get("/healthz", tags=["ops"])
def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses=ERRORS, tags=["ops"])
def readyz(served: ServedDep) -> dict[str, object]:
    """Readiness: model and index loaded (503 otherwise)."""
    return {"status": "ready", "index_size": len(served.snapshot.items)}


@router.get("/metrics", tags=["ops"])
def metrics_endpoint(metrics: MetricsDep) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
