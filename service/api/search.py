"""Search by text and by image. Plain `def` endpoints: FastAPI's threadpool runs them, so the
event loop never blocks on torch or NumPy."""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, File, Form, HTTPException, UploadFile

from common.errors import InputError
from service.api.deps import ERRORS, LoadedDep, MetricsDep, SettingsDep
from service.schemas import Hit, SearchResponse, Target, TextSearch
from service.settings import Settings
from service.uploads import decode_image
from store.ids import ItemId
from store.metadata import Item
from store.store import Hits

router = APIRouter(tags=["search"])


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


@router.post("/v1/search/text", responses=ERRORS)
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


@router.post("/v1/search/image", responses=ERRORS)
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
