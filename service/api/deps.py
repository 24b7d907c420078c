"""What every endpoint depends on: settings, the loaded model and store, metrics, jobs, the key.

Every dependency is `async def`: FastAPI runs a plain `def` dependency in its threadpool, one
hand-off per dependency per request, and these do no I/O. The plain getters stay for routes
that call them directly.

The key is checked before the body is read: FastAPI parses and validates a body before it runs
a route's dependencies, so `require_key` alone would answer a bad body without a key with 422.
Routes of a router made with `route_class=KeyFirst` that depend on `require_key` check the
X-API-Key header first (401), and only then read the body.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader

from common.errors import NotReadyError
from service.jobs import JobManager
from service.metrics import Metrics
from service.middleware import LOADED_KEY
from service.schemas import ErrorBody
from service.serving import Serving
from service.settings import Settings
from service.state import Loaded

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "bad input: the detail says what was expected"},
    401: {"model": ErrorBody, "description": "missing or wrong X-API-Key"},
    404: {"model": ErrorBody, "description": "unknown id or job"},
    413: {"model": ErrorBody, "description": "body or upload too large"},
    415: {"model": ErrorBody, "description": "not an image upload"},
    503: {"model": ErrorBody, "description": "model and index not loaded yet"},
}
T = TypeVar("T")
API_KEY = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="the server's CMH_API_KEY, when one is set (build and delete only)",
)


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    return settings


def get_loaded(request: Request) -> Loaded:
    """The version (model and store) this request holds from start to end (its lease: service.
    middleware.ServedVersion); NotReadyError (503) before lifespan has loaded one."""
    loaded = request.scope.get(LOADED_KEY)
    if not isinstance(loaded, Loaded):
        raise NotReadyError("the model and index are not loaded yet")
    return loaded


def get_serving(request: Request) -> Serving:
    """This process's served version and the switch to another; 503 before one is loaded."""
    serving = getattr(request.app.state, "serving", None)
    if not isinstance(serving, Serving):
        raise NotReadyError("the model and index are not loaded yet")
    return serving


def get_metrics(request: Request) -> Metrics:
    """The app's metrics."""
    metrics = request.app.state.metrics
    assert isinstance(metrics, Metrics)
    return metrics


def in_event_loop(getter: Callable[[Request], T]) -> Callable[[Request], Coroutine[Any, Any, T]]:
    """`getter` as an async dependency (run in the event loop, not the threadpool)."""

    async def dependency(request: Request) -> T:
        return getter(request)

    dependency.__doc__ = getter.__doc__
    return dependency


SettingsDep = Annotated[Settings, Depends(in_event_loop(get_settings))]
LoadedDep = Annotated[Loaded, Depends(in_event_loop(get_loaded))]
ServingDep = Annotated[Serving, Depends(in_event_loop(get_serving))]
MetricsDep = Annotated[Metrics, Depends(in_event_loop(get_metrics))]


async def get_jobs(loaded: LoadedDep) -> JobManager:
    """The build job manager."""
    return loaded.jobs


def check_key(settings: Settings, given: str | None) -> None:
    """When an API key is configured, `given` must be it (else 401), compared in constant time."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value()
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "expected a valid X-API-Key header for this endpoint")


async def require_key(
    settings: SettingsDep,
    x_api_key: Annotated[str | None, Depends(API_KEY)] = None,
) -> None:
    """When an API key is configured, the X-API-Key header must carry it (else 401)."""
    check_key(settings, x_api_key)


class KeyFirst(APIRoute):
    """An APIRoute that, when it depends on `require_key`, checks the key before the body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The route's handler, preceded by the key check where the route needs a key."""
        handler = super().get_route_handler()
        if not any(d.dependency is require_key for d in self.dependencies):
            return handler

        async def key_first(request: Request) -> Response:
            check_key(get_settings(request), request.headers.get(API_KEY.model.name))
            return await handler(request)

        return key_first


JobsDep = Annotated[JobManager, Depends(get_jobs)]
