"""The FastAPI app: `create_app(settings)`; lifespan loads the checkpoint and opens the store once.

Errors, one status per kind, one body shape ({"detail": str, "errors": [...]}):
- InputError -> 400 (a batch build that fails validation lists each bad item in "errors")
- missing or wrong API key -> 401
- unknown item, job or image -> 404
- body or upload too large -> 413
- upload that is not an image content type -> 415
- schema violations -> 422 (FastAPI's own body)
- IntegrityError (stored data failed its checksum) -> 500, saying which item
- NotReadyError (no model or index loaded) -> 503
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import InputError, IntegrityError, NotReadyError
from service.api import router
from service.encoder import Encoder, load_served_model
from service.indexing import Indexer
from service.jobs import JobManager
from service.metrics import Metrics
from service.milvus_serving import MilvusMirror
from service.pages import router as pages_router
from service.settings import Settings
from service.state import Loaded
from store.compaction import Compactor
from store.layout import CHECKPOINT_NAME, open_store

logger = logging.getLogger(__name__)


def load(settings: Settings, metrics: Metrics) -> Loaded:
    """Load checkpoint and backbone and open the store; InputError saying what does not match."""
    artifacts = settings.artifacts_dir
    model = load_served_model(artifacts, device=settings.device)
    checkpoint, backbone, expected = model.checkpoint, model.backbone, model.manifest
    milvus_uri = settings.milvus_uri if settings.index_backend == "milvus" else None
    if settings.index_backend == "milvus" and not milvus_uri:
        raise InputError("expected CMH_MILVUS_URI with CMH_INDEX_BACKEND=milvus, got none")
    store = open_store(artifacts, expected=expected)
    encoder = Encoder(
        checkpoint,
        backbone,
        window_ms=settings.batch_window_ms,
        max_batch=settings.max_image_batch,
        on_batch=metrics.image_batch.observe,
    )
    mirror = None
    if milvus_uri:
        token = settings.milvus_token.get_secret_value() if settings.milvus_token else ""
        mirror = MilvusMirror(store, uri=milvus_uri, token=token)
    Compactor(store)
    indexer = Indexer(store=store, encoder=encoder, max_pixels=settings.max_image_pixels)
    return Loaded(
        settings=settings,
        metrics=metrics,
        encoder=encoder,
        store=store,
        indexer=indexer,
        jobs=JobManager(),
        mirror=mirror,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load everything once; stop the batcher and the job worker on shutdown."""
    settings: Settings = app.state.settings
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # `cmh serve` loads before uvicorn starts, so that a refusal is one line and exit 2.
    preloaded = getattr(app.state, "loaded", None)
    loaded = preloaded if isinstance(preloaded, Loaded) else load(settings, app.state.metrics)
    logger.info(
        "loaded model n_bits=%d (%s) from %s; store with %d items",
        loaded.encoder.n_bits,
        loaded.encoder.backbone.name,
        settings.artifacts_dir / CHECKPOINT_NAME,
        len(loaded.store),
    )
    app.state.loaded = loaded
    loaded.metrics.set_index_size(len(loaded.store), len(loaded.store))
    try:
        yield
    finally:
        loaded.jobs.close()
        loaded.encoder.close()
        if loaded.mirror is not None:
            loaded.mirror.close()
        loaded.store.close()


def _error(status: int, detail: str, errors: list[object] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail, "errors": errors or []}, status_code=status)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app over the artifacts folder in `settings` (read from CMH_* variables by default)."""
    settings = settings or Settings()
    # FastAPIOffline: /docs (Swagger UI) and /redoc load their scripts from this server, not a
    # CDN, so the API docs work on a machine without internet, like everything else here.
    app = FastAPIOffline(
        title="cmh: cross-modal hashing search",
        version="0.1.0",
        description="Search images with text and text with images over AUCMH binary codes.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.include_router(router)
    app.include_router(pages_router)

    @app.exception_handler(InputError)
    async def input_error(_: Request, err: InputError) -> JSONResponse:
        errors = [e.model_dump() for e in getattr(err, "errors", [])]
        return _error(400, str(err), errors)

    @app.exception_handler(IntegrityError)
    async def integrity_error(_: Request, err: IntegrityError) -> JSONResponse:
        logger.error("%s", err)
        return _error(500, str(err))

    @app.exception_handler(NotReadyError)
    async def not_ready(_: Request, err: NotReadyError) -> JSONResponse:
        return _error(503, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.middleware("http")
    async def limits_and_metrics(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        start = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            response: Response = _error(
                413, f"expected a body of at most {settings.max_body_bytes} bytes, got {length}"
            )
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        metrics: Metrics = request.app.state.metrics
        metrics.requests.labels(request.method, name, str(response.status_code)).inc()
        metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response

    return app
