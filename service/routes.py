"""The HTTP endpoints. Those that compute are plain `def` (FastAPI's threadpool runs them), so the
event loop never blocks on torch or NumPy."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.errors import InputError, NotReadyError
from models.datasets import load_dataset
from service.indexing import Pending
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
from service.state import Loaded
from service.uploads import decode_image, inside
from store.ids import ItemId, parse_id
from store.metadata import Item
from store.store import Hits

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
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    return settings


def get_loaded(request: Request) -> Loaded:
    """The served model and store; NotReadyError (503) before lifespan has loaded them."""
    loaded = getattr(request.app.state, "loaded", None)
    if not isinstance(loaded, Loaded):
        raise NotReadyError("the model and index are not loaded yet")
    return loaded


def get_metrics(request: Request) -> Metrics:
    """The app's metrics."""
    metrics = request.app.state.metrics
    assert isinstance(metrics, Metrics)
    return metrics


def get_jobs(loaded: Annotated[Loaded, Depends(get_loaded)]) -> JobManager:
    """The build job manager."""
    return loaded.jobs


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
LoadedDep = Annotated[Loaded, Depends(get_loaded)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
JobsDep = Annotated[JobManager, Depends(get_jobs)]


def check_k(k: int, settings: Settings) -> None:
    """k must be within the server's bound."""
    if not 1 <= k <= settings.max_k:
        raise InputError(f"expected k in 1..{settings.max_k}, got {k}")


def image_url(item_id: ItemId) -> str:
    """Where an item's image is served (string ids are URL-quoted)."""
    return f"/v1/items/{quote(str(item_id), safe='')}/image"


def ranked(found: list[tuple[Item, int]]) -> list[Hit]:
    """Hits with metadata, nearest first (the store drops the padding of a k past its size)."""
    return [
        Hit(
            id=item.id,
            distance=dist,
            text=item.text,
            image_url=image_url(item.id),
            fields=item.fields,
        )
        for item, dist in found
    ]


@router.post("/v1/search/text", responses=ERRORS, tags=["search"])
def search_text(
    body: TextSearch, loaded: LoadedDep, settings: SettingsDep, metrics: MetricsDep
) -> SearchResponse:
    """Search the image (or text) index with a text."""
    check_k(body.k, settings)
    start = time.perf_counter()
    code, unknown = loaded.encoder.encode_texts([body.text])
    metrics.encode.labels("text").observe(time.perf_counter() - start)
    found: Hits = loaded.store.search(body.target, code, body.k, searcher=loaded.searcher)
    return SearchResponse(
        target=body.target,
        k=body.k,
        n_bits=loaded.encoder.n_bits,
        generation=str(found.commit),
        no_known_words=bool(unknown[0]),
        hits=ranked(found.hits[0]),
    )


@router.post("/v1/search/image", responses=ERRORS, tags=["search"])
def search_image(
    loaded: LoadedDep,
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
    start = time.perf_counter()
    code = loaded.encoder.encode_image(image)
    metrics.encode.labels("image").observe(time.perf_counter() - start)
    found = loaded.store.search(target, code, k, searcher=loaded.searcher)
    return SearchResponse(
        target=target,
        k=k,
        n_bits=loaded.encoder.n_bits,
        generation=str(found.commit),
        hits=ranked(found.hits[0]),
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
    loaded: LoadedDep,
    settings: SettingsDep,
    jobs: JobsDep,
    metrics: MetricsDep,
) -> JobAccepted:
    """Validate a batch (or a dataset root) now, then index it in a background job."""
    pending: list[Pending] = []
    indexer, on_conflict = loaded.indexer, body.on_conflict
    if body.items is not None:  # items are checked now: a bad batch is a 400 listing each item
        if len(body.items) > settings.max_batch_items:
            raise InputError(
                f"expected at most {settings.max_batch_items} items, got {len(body.items)}"
            )
        pending = indexer.validate_items(
            body.items,
            data_dir=settings.server_data_dir,
            max_image_bytes=settings.max_upload_bytes,
            on_conflict=on_conflict,
        )
    dataset = body.dataset

    def work(progress: Callable[[int, int], None]) -> JobStatus:
        if dataset is not None:  # a dataset is read and checked in the job: it can be large
            if settings.server_data_dir is None:
                raise InputError("expected CMH_SERVER_DATA_DIR to be set for dataset builds")
            data = load_dataset(dataset.name, inside(settings.server_data_dir, dataset.root))
            outcome = indexer.add_dataset(data, progress, on_conflict=on_conflict)
            added, skipped, commit = outcome.added, outcome.skipped, outcome.commit
        else:
            commit = indexer.add(pending, progress, on_conflict=on_conflict)
            added, skipped = len(pending), []
        metrics.set_index_size(len(loaded.store), len(loaded.store))
        return JobStatus(
            job_id="",
            status="succeeded",
            done=added,
            total=added,
            added=added,
            skipped=skipped,
            generation=str(commit),
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


def path_id(item_id: str) -> ItemId:
    """The id named in a URL path ("5" is the integer 5)."""
    try:
        return parse_id(item_id)
    except InputError as err:
        raise HTTPException(404, f"expected an indexed id, got {item_id[:80]!r}: {err}") from None


@router.delete(
    "/v1/items/{item_id:path}",
    responses=ERRORS,
    tags=["index"],
    dependencies=[Depends(require_key)],
)
def delete_item(item_id: str, loaded: LoadedDep, metrics: MetricsDep) -> DeleteResponse:
    """Remove an item from both indexes (durable before it is acknowledged)."""
    wanted = path_id(item_id)
    removed = loaded.store.delete([wanted])
    if not removed:
        raise HTTPException(404, f"expected an indexed id, got {wanted!r}")
    metrics.set_index_size(len(loaded.store), len(loaded.store))
    return DeleteResponse(id=removed[0], removed=True, generation=str(loaded.store.view().commit))


@router.get("/v1/items/{item_id:path}/image", responses=ERRORS, tags=["index"])
def item_image(item_id: str, loaded: LoadedDep) -> FileResponse:
    """The stored image of an indexed item (only files the index refers to are ever served)."""
    wanted = path_id(item_id)
    item = loaded.store.get(wanted)
    if item is None:
        raise HTTPException(404, f"expected an indexed id, got {wanted!r}")
    path = loaded.store.artifacts / item.image
    if not path.is_file():
        raise HTTPException(404, f"the image of item {wanted!r} is missing from the artifacts")
    return FileResponse(path)


@router.get("/v1/index/stats", responses=ERRORS, tags=["index"])
def index_stats(loaded: LoadedDep) -> IndexStats:
    """What is being served: sizes, bits, commit, segments, backbone and vocabulary."""
    view, enc = loaded.store.view(), loaded.encoder
    return IndexStats(
        items=view.count,
        n_bits=enc.n_bits,
        generation=str(view.commit),
        segments=len(view.parts),
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
def readyz(loaded: LoadedDep) -> dict[str, object]:
    """Readiness: model and index loaded (503 otherwise)."""
    return {"status": "ready", "index_size": len(loaded.store)}


@router.get("/metrics", tags=["ops"])
def metrics_endpoint(metrics: MetricsDep) -> Response:
    """Prometheus metrics."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
