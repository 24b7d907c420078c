"""What every endpoint depends on: settings, the loaded model and store, metrics, jobs, the key."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request

from common.errors import NotReadyError
from service.jobs import JobManager
from service.metrics import Metrics
from service.schemas import ErrorBody
from service.settings import Settings
from service.state import Loaded

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
