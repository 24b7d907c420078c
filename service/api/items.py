"""Items: delete one, serve its stored image; what is being served (stats)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse

from common.errors import InputError
from service.api.deps import (
    ERRORS,
    KeyFirst,
    LoadedDep,
    MetricsDep,
    ServingDep,
    require_key,
)
from service.errors import printable
from service.schemas import DeleteResponse, IndexStats, VersionStats
from service.uploads import servable_image
from store import versions
from store.ids import ItemId, parse_id

logger = logging.getLogger(__name__)
router = APIRouter(tags=["index"], route_class=KeyFirst)
IMAGE = {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}}


def path_id(item_id: str) -> ItemId:
    """The id named in a URL path ("5" is the integer 5)."""
    try:
        return parse_id(item_id)
    except InputError as err:
        shown = printable(item_id[:80])
        raise HTTPException(404, f"expected an indexed id, got {shown!r}: {err}") from None


# The image route comes first: "/v1/items/5/image" also matches the delete route (as the id
# "5/image"), and a method neither has (OPTIONS, PUT) gets the 405 of the first route that
# matches the path, whose Allow header must then be the image's GET.
@router.get(
    "/v1/items/{item_id:path}/image",
    responses={**ERRORS, 200: {"description": "the image file, as it was added", **IMAGE}},
    response_class=FileResponse,
)
def item_image(item_id: str, loaded: LoadedDep) -> FileResponse:
    """The stored image of an indexed item (only files the index refers to are ever served)."""
    wanted = path_id(item_id)
    item = loaded.store.get(wanted)
    if item is None:
        raise HTTPException(404, f"expected an indexed id, got {wanted!r}")
    try:
        path = servable_image(loaded.store.artifacts, item.image)
    except InputError as err:  # a row that names another file (a Milvus row written by hand)
        logger.warning("item %r: its image is not served: %s", wanted, err)
        raise HTTPException(404, f"the image of item {wanted!r} is not served: {err}") from None
    if not path.is_file():
        raise HTTPException(404, f"the image of item {wanted!r} is missing from the artifacts")
    return FileResponse(path)


@router.delete(
    "/v1/items/{item_id:path}",
    responses=ERRORS,
    dependencies=[Depends(require_key)],
)
def delete_item(item_id: str, serving: ServingDep, metrics: MetricsDep) -> DeleteResponse:
    """Remove an item from both indexes (durable before it is acknowledged)."""
    wanted = path_id(item_id)
    # On the version served when it commits (a switch meanwhile: the new one, see Serving.write)
    removed = serving.write(lambda loaded: loaded.store.delete([wanted]))
    if not removed.ids:
        raise HTTPException(404, f"expected an indexed id, got {wanted!r}")
    store = serving.current().store
    metrics.set_index_size(len(store), len(store))
    # The commit that removed it: the view's, read after, could already be another write's.
    return DeleteResponse(id=removed.ids[0], removed=True, commit=str(removed.commit))


@router.get("/v1/index/stats", responses=ERRORS)
def index_stats(loaded: LoadedDep) -> IndexStats:
    """What is being served: sizes, bits, commit, segments, backbone and vocabulary."""
    view, enc = loaded.store.view(), loaded.encoder
    every = versions.versions(loaded.settings.artifacts_dir, current=loaded.version)
    return IndexStats(
        version=loaded.version,
        versions=[
            VersionStats(
                name=v.name,
                current=v.name == loaded.version,
                state=v.state,
                source=v.source,
                disk_bytes=v.disk_bytes,
            )
            for v in every
        ],
        items=view.count,
        n_bits=enc.n_bits,
        commit=str(view.commit),
        segments=len(view.parts),
        image_backbone=enc.backbone.name,
        checkpoint_dataset=enc.checkpoint.dataset,
        vocabulary_size=enc.vectorizer.dim,
        device=str(enc.backbone.device),
    )
