"""Administration: switch the served version (store/versions.py) without stopping the server."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from service.api.deps import ERRORS, KeyFirst, MetricsDep, ServingDep, require_key
from service.schemas import CaughtUp, ErrorBody, ReloadRequest, ReloadResponse

router = APIRouter(tags=["admin"], route_class=KeyFirst)


CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "no such version, not ready, or the served one"}
}


@router.post(
    "/v1/admin/reload", responses={**ERRORS, **CONFLICT}, dependencies=[Depends(require_key)]
)
def reload(
    serving: ServingDep, metrics: MetricsDep, body: ReloadRequest | None = None
) -> ReloadResponse:
    """Serve another version (made by `cmh index reindex`; an older one rolls back): it is
    loaded while the served one keeps answering, caught up with the writes made since its
    reindex while writes wait, then swapped in. Every worker serves it from the next request
    on; requests in flight finish on the version they started with."""
    switched = serving.switch(body.version if body is not None else None)
    store = serving.current().store
    metrics.set_index_size(len(store), len(store))
    counts = switched.caught_up
    return ReloadResponse(
        version=switched.version,
        previous=switched.previous,
        caught_up=CaughtUp(copied=counts.copied, deleted=counts.deleted, seconds=counts.seconds),
        seconds=switched.seconds,
    )
