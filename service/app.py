"""The FastAPI app: `create_app(settings)`; lifespan loads the checkpoint and opens the store once.

Errors, one status per kind, one body shape ({"detail": str, "errors": [...]}):
- InputError -> 400 (a batch build that fails validation lists each bad item in "errors")
- missing or wrong API key -> 401
- unknown item, job or image -> 404; a method the route does not have -> 405 (with Allow)
- body or upload too large -> 413 (a body is limited while it streams, chunked or not)
- upload that is not an image content type -> 415
- schema violations -> 422 (FastAPI's own body, its echoed input cut to 200 characters)
- QueueFull (too many builds waiting) -> 429, with Retry-After
- IntegrityError (stored data failed its checksum) -> 500, saying which item
- NotReadyError (no model or index loaded) -> 503
Every error body can be encoded: strings Python holds and UTF-8 cannot are shown escaped.
The OpenAPI schema states the limits that come from settings (k, items per build, image/*).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from anyio import CapacityLimiter
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import (
    BackendError,
    ConflictError,
    InputError,
    IntegrityError,
    NoSpaceError,
    NotReadyError,
    is_no_space,
)
from models.features.text import load_segmenter
from service.api import router
from service.encoder import Encoder, load_served_model
from service.errors import error_response, http_detail, validation_body
from service.indexing import Indexer, held_as_given
from service.jobs import JOBS_NAME, JobManager, QueueFull
from service.metrics import Metrics
from service.middleware import BodyLimit, RequestMetrics, ServedVersion
from service.pages import router as pages_router
from service.schemas import MAX_RANK
from service.serving import Serving, switch_in_background
from service.settings import Settings
from service.state import Loaded
from service.stores import milvus_pointer, open_item_store
from service.suggestions import Suggestions
from service.uploads import DECODES
from store import versions
from store.layout import CHECKPOINT_NAME
from store.milvus_versions import PointerWatch
from store.store import Store

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5  # what a 429 tells a client to wait before it submits again


def load_version(
    settings: Settings,
    metrics: Metrics,
    name: str,
    *,
    shared: bool,
    jobs: JobManager | None,
    text_searches: CapacityLimiter,
    reuse: Loaded | None = None,
    watch: PointerWatch | None = None,
) -> Loaded:
    """Load version `name`'s checkpoint (and its backbone, unless `reuse` has the same one) and
    open its store; InputError saying what does not match. `jobs` None: a job manager over
    this version's store is made (the first version a process loads)."""
    folder = versions.version_dir(settings.artifacts_dir, name)
    same = reuse.encoder.backbone if reuse is not None else None
    model = load_served_model(folder, device=settings.device, backbone=same)
    checkpoint, backbone, expected = model.checkpoint, model.backbone, model.manifest
    # A refusal after the store or the batcher is open closes them: the batcher's thread runs
    # torch, and one left running while the interpreter exits aborts it (SIGABRT, exit 134,
    # "terminate called without an active exception") after the one-line refusal.
    with ExitStack() as opened:
        store = open_item_store(
            settings, expected, shared=shared, folder=folder, version=name, watch=watch
        )
        opened.callback(store.close)
        encoder = Encoder(
            checkpoint,
            backbone,
            window_ms=settings.batch_window_ms,
            max_batch=settings.max_image_batch,
            on_batch=metrics.image_batch.observe,
        )
        opened.callback(encoder.close)
        DECODES.resize(settings.max_decode_pixels)
        indexer = Indexer(store=store, encoder=encoder, max_pixels=settings.max_image_pixels)
        if jobs is None:
            jobs = JobManager(
                settings.artifacts_dir / JOBS_NAME,
                max_queued=settings.max_queued_jobs,
                reconcile=partial(held_as_given, store),
            )
        opened.pop_all()
    return Loaded(
        version=name,
        settings=settings,
        metrics=metrics,
        encoder=encoder,
        store=store,
        indexer=indexer,
        jobs=jobs,
        text_searches=text_searches,
        suggestions=Suggestions(encoder.vectorizer, store),
    )


def take_writes_if_served(store: Store, artifacts: Path, name: str) -> None:
    """A served store that a switch retired takes writes again: a switch stopped between
    retiring it and naming the new version in CURRENT (kill -9), or CURRENT set by hand. Read
    under the store's writer lock, where a switch retires and writes CURRENT, so a version
    another worker has just switched away from is left retired."""
    with store.switching() as retire:
        if store.retired and versions.current_name(artifacts) == name:
            logger.warning("version %s is served (CURRENT) but was retired: it takes writes", name)
            retire(False)


def load(settings: Settings, metrics: Metrics, *, shared: bool = False) -> Serving:
    """Load the served version (CURRENT in the artifacts folder) and what switches from it to
    another; InputError saying what does not match.

    `shared`: the store is opened by several worker processes at once (`cmh serve --workers`).
    """
    load_segmenter()  # before the first Chinese query, not inside it (it held the event loop)
    watch = PointerWatch(milvus_pointer(settings)) if settings.index_backend == "milvus" else None
    try:
        name = (
            watch.served() if watch is not None else versions.current_name(settings.artifacts_dir)
        )
        limiter = CapacityLimiter(settings.search_threads)
        first = load_version(
            settings, metrics, name, shared=shared, jobs=None, text_searches=limiter, watch=watch
        )
    except BaseException:
        if watch is not None:
            watch.close()
        raise
    if isinstance(first.store, Store):
        take_writes_if_served(first.store, settings.artifacts_dir, name)

    def another(version: str, reuse: Loaded | None) -> Loaded:
        return load_version(
            settings,
            metrics,
            version,
            shared=shared,
            jobs=first.jobs,
            text_searches=limiter,
            reuse=reuse,
            watch=watch,
        )

    serving = Serving(settings.artifacts_dir, first, another, follower=watch)
    # a job stopped after a switch is settled against the store served then
    first.jobs.reconcile_with(lambda entries: held_as_given(serving.current().store, entries))
    return serving


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load everything once; stop the batcher and the job worker on shutdown."""
    settings: Settings = app.state.settings
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # `cmh serve` loads before uvicorn starts, so that a refusal is one line and exit 2.
    preloaded = getattr(app.state, "serving", None)
    serving = preloaded if isinstance(preloaded, Serving) else load(settings, app.state.metrics)
    loaded = serving.current()
    logger.info(
        "loaded version %s: model n_bits=%d (%s) from %s; store with %d items",
        loaded.version,
        loaded.encoder.n_bits,
        loaded.encoder.backbone.name,
        versions.version_dir(settings.artifacts_dir, loaded.version) / CHECKPOINT_NAME,
        len(loaded.store),
    )
    app.state.serving = serving
    loaded.metrics.set_index_size(len(loaded.store), len(loaded.store))
    loop = asyncio.get_running_loop()
    try:  # SIGUSR1 switches to the newest ready version, as POST /v1/admin/reload does
        loop.add_signal_handler(signal.SIGUSR1, switch_in_background, serving)
        on_signal = True
    except (RuntimeError, ValueError, NotImplementedError):  # not the main thread (a test client)
        on_signal = False
    try:
        yield
    finally:
        if on_signal:
            loop.remove_signal_handler(signal.SIGUSR1)
        serving.close()


def stated_limits(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The generated OpenAPI schema, saying what the server enforces from its settings."""
    components = schema["components"]["schemas"]
    components["TextSearch"]["properties"]["k"]["maximum"] = settings.max_k
    components["TextSearch"]["properties"]["offset"]["maximum"] = MAX_RANK - settings.max_k
    items = components["BuildRequest"]["properties"]["items"]
    next(s for s in items["anyOf"] if s.get("type") == "array")["maxItems"] = (
        settings.max_batch_items
    )
    upload = schema["paths"]["/v1/search/image"]["post"]["requestBody"]["content"]
    form = upload["multipart/form-data"]
    form["encoding"] = {"file": {"contentType": "image/*"}}
    image_form = components[form["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
    image_form["k"]["maximum"] = settings.max_k
    image_form["offset"]["maximum"] = MAX_RANK - settings.max_k
    if settings.api_key is None:  # no key configured: nothing asks for one
        schema["components"].pop("securitySchemes", None)
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation.pop("security", None)
    return schema


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
    app.state.metrics = metrics = Metrics()
    app.include_router(router)
    app.include_router(pages_router)
    generated = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = stated_limits(generated(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it

    @app.exception_handler(InputError)
    async def input_error(_: Request, err: InputError) -> JSONResponse:
        return error_response(400, str(err), getattr(err, "errors", []))

    @app.exception_handler(ConflictError)
    async def conflict(_: Request, err: ConflictError) -> JSONResponse:
        return error_response(409, str(err))

    @app.exception_handler(IntegrityError)
    async def integrity_error(_: Request, err: IntegrityError) -> JSONResponse:
        logger.error("%s", err)
        return error_response(500, str(err))

    @app.exception_handler(NotReadyError)
    async def not_ready(_: Request, err: NotReadyError) -> JSONResponse:
        return error_response(503, str(err))

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, err: QueueFull) -> JSONResponse:
        return error_response(429, str(err), headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(BackendError)
    async def backend_error(_: Request, err: BackendError) -> JSONResponse:
        logger.error("%s", err)
        return error_response(500, str(err))

    @app.exception_handler(NoSpaceError)
    async def no_space(_: Request, err: NoSpaceError) -> JSONResponse:
        logger.error("%s", err)
        return error_response(507, str(err))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        # Every answer in the one JSON shape, a bug's too (Starlette's default is plain text).
        # A full device found outside the store (the job records) still says what it is.
        if is_no_space(err):
            where = settings.artifacts_dir
            return error_response(507, f"no space left on the device holding {where}")
        logger.error("internal error answering a request", exc_info=err)
        return error_response(500, f"internal error: {type(err).__name__}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        detail = http_detail(err, str(err.detail))
        return error_response(err.status_code, detail, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_body(err.errors()), status_code=422)

    # Outermost last: metrics see every answer, the 413s of the body limit included.
    # Each request holds one version (model and store) from start to end: innermost, so the
    # lease spans everything that reads them.
    app.add_middleware(ServedVersion)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def create_served_app(settings: Settings | None = None, *, shared: bool = False) -> FastAPI:
    """The app with everything loaded: what `cmh serve` runs, in each of its processes.

    A refusal (a mismatched store, a missing checkpoint...) raises here, before any server
    listens. `shared`: the store is opened for several worker processes at once. What is loaded
    by then (torch, numba, the model: half a million objects) lives as long as the process and is
    kept out of the cyclic garbage collector, whose full passes over it stalled every request for
    0.5-0.7 s (the p99 of `cmh bench service` at 32 connections).
    """
    app = create_app(settings)
    app.state.serving = load(app.state.settings, app.state.metrics, shared=shared)
    gc.freeze()
    return app


def create_worker_app() -> FastAPI:
    """One worker process of `cmh serve --workers N`: uvicorn calls this factory in each one.

    Settings come from the CMH_* environment (the parent set CMH_ARTIFACTS_DIR); the store is
    opened shared with the other workers.
    """
    return create_served_app(shared=True)
