"""Search by text and by image.

Both endpoints are `async def` and read the app's state with the deps functions called directly:
FastAPI runs every plain `def` dependency, a `def` endpoint and that endpoint's response
validation each in its threadpool, five thread hand-offs per request, which cost more CPU than a
text search's own work.

A text search without a filter runs in the event loop, with no hand-off at all: the encoding is
NumPy over a few weight columns and the store's `search_now` scans on this thread alone and
never waits for a lock (about 0.3 ms at 1M items; it declines a scan of 16 MiB of codes or more,
which would hold the loop for milliseconds). A thread hand-off costs more than that on these
machines: a round trip to a worker thread and back wakes two threads, and in `cmh bench service`
at 1M items the hand-off cost 20-30% of the throughput at 1, 8 and 32 connections (README,
"Service figures"). What can wait goes to a worker thread, one of the few of
`Loaded.text_searches`: a search `search_now` declines (the view must catch up with another
process's commit while this process's writer holds the lock, the scan is that large, or the
Milvus backend, which waits on its server) and a filtered search, whose cost grows with the rows
that pass its filter. A wait or a long scan in the event loop stalls every connection (before
the scan of one query ran on one thread, its wait for the second thread gave a p99 of 1.6-3 s
at 32 connections there; at 10M items scans of 5 ms each in the loop gave 0.9-1.2 s). An image
search does its blocking work (read, decode, the batcher, the search) in ONE threadpool call.

A filter (service/schemas.py's SearchFilter) is a JSON body field of a text search and a JSON
form field of an image search; without one nothing changes on either path. So are the scoring
(Hamming or asymmetric), the offset and the radius (max_distance): docs/search-api.md. A text
query none of whose words the model knows is answered at once, with no hits and the words named.
A batch of text searches runs each as the single search does, one after another.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Annotated, Any, NamedTuple
from urllib.parse import quote

from anyio import lowlevel, to_thread
from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from common.errors import InputError
from common.fields import MAX_FIELDS_DEPTH, depth
from indexes.asymmetric import Asymmetric
from indexes.codes import MAX_BITS
from models.features.query_words import QueryText
from service.api.deps import ERRORS, get_loaded, get_metrics, get_settings
from service.encoder import EncodedQuery
from service.metrics import Metrics
from service.schemas import (
    DEFAULT_SCORING,
    MAX_DISTANCE_DESCRIPTION,
    MAX_RANK,
    OFFSET_DESCRIPTION,
    SCORING_DESCRIPTION,
    BatchResponse,
    Hit,
    Scoring,
    SearchFilter,
    SearchResponse,
    SuggestedWords,
    Target,
    TextBatch,
    TextSearch,
)
from service.settings import Settings
from service.state import Loaded
from service.suggestions import MAX_SUGGESTIONS
from service.uploads import decode_image
from store.filters import Filter
from store.ids import ItemId
from store.metadata import Item
from store.store import Hits

logger = logging.getLogger(__name__)
# A query text longer than this is read (segmented) on a worker thread: jieba takes about 2.5 us
# a character, so a 10,000-character Chinese query held the event loop for 20-25 ms.
INLINE_QUERY_CHARS = 400
router = APIRouter(tags=["search"])


def check_window(k: int, offset: int, settings: Settings) -> None:
    """k within the server's max_k, offset within MAX_RANK - max_k: offset + k <= MAX_RANK."""
    if not 1 <= k <= settings.max_k:
        raise InputError(f"expected k in 1..{settings.max_k}, got {k}")
    deepest = MAX_RANK - settings.max_k
    if not 0 <= offset <= deepest:
        raise InputError(
            f"expected offset in 0..{deepest} (offset + k <= {MAX_RANK}, k up to "
            f"{settings.max_k}), got {offset}"
        )


def image_url(item_id: ItemId) -> str:
    """Where an item's image is served (string ids are URL-quoted)."""
    return f"/v1/items/{quote(str(item_id), safe='')}/image"


def ranked(found: Hits, offset: int) -> list[Hit]:
    """The hits of the one query of `found` from rank `offset` on, with their metadata (the
    store drops the padding of a k past its size)."""
    return [
        Hit(
            id=item.id,
            distance=dist,
            score=score,
            text=item.text,
            image_url=image_url(item.id),
            fields=servable_fields(item),
        )
        for (item, dist), score in zip(
            found.hits[0][offset:], found.scores[0][offset:], strict=True
        )
    ]


def asymmetric_of(encoded: EncodedQuery) -> Asymmetric | None:
    """The asymmetric ranking of a query encoded with its real output, else None (Hamming)."""
    return None if encoded.real is None else Asymmetric.of(encoded.code, encoded.real)


def servable_fields(item: Item) -> dict[str, Any]:
    """The item's fields, or {} (logged) where they nest past MAX_FIELDS_DEPTH.

    Builds refuse such fields, but a store written before that limit, or a Milvus collection
    written by another client, may hold them, and one would fail every response it is in.
    """
    if depth(item.fields, stop=MAX_FIELDS_DEPTH) <= MAX_FIELDS_DEPTH:
        return item.fields
    logger.warning(
        "item %r: fields nested deeper than %d levels are left out of its hits",
        item.id, MAX_FIELDS_DEPTH,
    )  # fmt: skip
    return {}


@router.post("/v1/search/text", responses=ERRORS)
async def search_text(body: TextSearch, request: Request) -> SearchResponse:
    """Search the image (or text) index with a text."""
    loaded, settings, metrics = get_loaded(request), get_settings(request), get_metrics(request)
    check_window(body.k, body.offset, settings)
    return await _text_search(loaded, metrics, body)


@router.post("/v1/search/text/batch", responses=ERRORS)
async def search_text_batch(body: TextBatch, request: Request) -> BatchResponse:
    """Several text searches (at most MAX_BATCH_QUERIES), each answered as its single search."""
    loaded, settings, metrics = get_loaded(request), get_settings(request), get_metrics(request)
    for i, query in enumerate(body.queries):
        try:
            check_window(query.k, query.offset, settings)
        except InputError as err:
            raise InputError(f"queries[{i}]: {err}") from None
    results = []
    for query in body.queries:
        results.append(await _text_search(loaded, metrics, query))
        # Each search may run in the event loop: let other connections in between, so that a
        # batch holds the loop no longer than one search does.
        await lowlevel.checkpoint()
    return BatchResponse(results=results)


async def _text_search(loaded: Loaded, metrics: Metrics, body: TextSearch) -> SearchResponse:
    """One text search: its words read, encoded, and the store searched (see the docstring)."""
    encoder = loaded.encoder
    start = time.perf_counter()
    if len(body.text) <= INLINE_QUERY_CHARS:
        words = encoder.read_query(body.text)
    else:  # segmenting a long Chinese text holds the thread for milliseconds: not the loop's
        words = await to_thread.run_sync(
            encoder.read_query, body.text, limiter=loaded.text_searches
        )
    if not words.used:
        return _no_known_words(body, words, encoder.n_bits)
    encoded = encoder.encode_query(words, real=body.scoring == "asymmetric")
    asymmetric = asymmetric_of(encoded)
    metrics.encode.labels("text").observe(time.perf_counter() - start)
    where = None if body.filter is None else body.filter.value
    window, radius, code = body.offset + body.k, body.max_distance, encoded.code
    found: Hits | None = None
    if where is None:
        found = loaded.store.search_now(
            body.target, code, window, asymmetric=asymmetric, radius=radius
        )
    if found is None:
        # Its own few threads (one per core by default), not the shared pool of 40: at 32
        # connections 32 threads contending for 2 cores and the GIL made each search slower.
        found = await to_thread.run_sync(
            partial(
                loaded.store.search,
                body.target,
                code,
                window,
                where=where,
                asymmetric=asymmetric,
                radius=radius,
            ),  # fmt: skip
            limiter=loaded.text_searches,
        )
    return SearchResponse(
        target=body.target,
        k=body.k,
        offset=body.offset,
        scoring=body.scoring,
        n_bits=encoder.n_bits,
        commit=str(found.commit),
        used_words=words.used,
        unknown_words=words.unknown,
        hits=ranked(found, body.offset),
    )


def _no_known_words(body: TextSearch, words: QueryText, n_bits: int) -> SearchResponse:
    """The answer to a text none of whose words the model knows: no hits, and why."""
    if words.unknown:
        listed = ", ".join(f"“{w}”" for w in words.unknown[:20])
        message = f"none of the words is in the model's vocabulary (ignored: {listed}): no hits"
    else:
        message = "the text has no words the model reads (only symbols or punctuation): no hits"
    return SearchResponse(
        target=body.target,
        k=body.k,
        offset=body.offset,
        scoring=body.scoring,
        n_bits=n_bits,
        commit="",
        no_known_words=True,
        used_words=[],
        unknown_words=words.unknown,
        message=message,
        hits=[],
    )


@router.get("/v1/search/words", responses=ERRORS)
def suggested(
    request: Request,
    n: Annotated[int, Query(ge=1, le=MAX_SUGGESTIONS, description="how many words")] = 8,
) -> SuggestedWords:
    """Words to try in a text search (the page's "Try:" row), for any collection."""
    return SuggestedWords(words=get_loaded(request).suggestions.words(n))


@router.post("/v1/search/image", responses=ERRORS)
async def search_image(
    request: Request,
    file: Annotated[UploadFile, File(description="a JPEG, PNG, WebP, GIF, BMP or TIFF image")],
    k: Annotated[int, Form(ge=1)] = 10,
    target: Annotated[Target, Form()] = "text",
    filter: Annotated[  # noqa: A002 (the form field's public name)
        str | None, Form(description="a JSON SearchFilter, as the text search's `filter`")
    ] = None,
    scoring: Annotated[Scoring, Form(description=SCORING_DESCRIPTION)] = DEFAULT_SCORING,
    offset: Annotated[int, Form(ge=0, le=MAX_RANK - 1, description=OFFSET_DESCRIPTION)] = 0,
    # A form field has no null: the default keeps every hit.
    max_distance: Annotated[int, Form(ge=0, description=MAX_DISTANCE_DESCRIPTION)] = MAX_BITS,
) -> SearchResponse:
    """Search the text (or image) index with an uploaded image."""
    loaded, settings, metrics = get_loaded(request), get_settings(request), get_metrics(request)
    check_window(k, offset, settings)
    if not (file.content_type or "").lower().startswith("image/"):
        raise HTTPException(415, f"expected an image/* upload, got {file.content_type!r}")
    where = None if filter is None else form_filter(filter)
    radius = None if max_distance >= MAX_BITS else max_distance
    ask = _ImageSearch(k, target, where, scoring, offset, radius)
    return await run_in_threadpool(_search_image, loaded, settings, metrics, file, ask)


class _ImageSearch(NamedTuple):
    """What an image search asks for, besides its image."""

    k: int
    target: Target
    where: Filter | None
    scoring: Scoring
    offset: int
    max_distance: int | None


def form_filter(text: str) -> Filter | None:
    """The filter of an image search's form field (JSON), or InputError saying what is wrong."""
    try:
        return SearchFilter.model_validate_json(text).value
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our checks
        raise InputError(
            f"expected the filter as JSON of a SearchFilter, got: {where + ': ' if where else ''}"
            f"{message}"
        ) from None


def _search_image(
    loaded: Loaded,
    settings: Settings,
    metrics: Metrics,
    file: UploadFile,
    ask: _ImageSearch,
) -> SearchResponse:
    """The blocking part of an image search: read, decode, encode (batcher), search."""
    data = file.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"expected an image of at most {settings.max_upload_bytes} bytes")
    image, _ = decode_image(
        data,
        max_pixels=settings.max_image_pixels,
        min_side=loaded.encoder.backbone.draft_min_side,
    )
    start = time.perf_counter()
    encoded = loaded.encoder.encode_image_query(image, real=ask.scoring == "asymmetric")
    asymmetric = asymmetric_of(encoded)
    metrics.encode.labels("image").observe(time.perf_counter() - start)
    found = loaded.store.search(
        ask.target,
        encoded.code,
        ask.offset + ask.k,
        where=ask.where,
        asymmetric=asymmetric,
        radius=ask.max_distance,
    )
    return SearchResponse(
        target=ask.target,
        k=ask.k,
        offset=ask.offset,
        scoring=ask.scoring,
        n_bits=loaded.encoder.n_bits,
        commit=str(found.commit),
        hits=ranked(found, ask.offset),
    )
