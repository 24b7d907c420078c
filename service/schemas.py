"""Request and response bodies. Bounds live here: most bad input is a 422 before our code runs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, model_validator

from common.errors import InputError
from store.ids import ItemId, parse_id

Target = Literal["image", "text"]
OnConflict = Literal["error", "replace"]


def _item_id(value: object) -> ItemId:
    try:
        return parse_id(value)
    except InputError as err:  # pydantic turns a ValueError into a 422 naming the field
        raise ValueError(str(err)) from None


# An integer (0..2**63-1) or a string of 1..256 characters; "5" and 5 are the same id.
UserId = Annotated[int | str, BeforeValidator(_item_id)]


class ErrorItem(BaseModel):
    """One failed item of a batch."""

    index: int = Field(description="position of the item in the request's list (or -1)")
    id: int | str | None = None
    reason: str


class ErrorBody(BaseModel):
    """The one error shape of every 4xx/5xx this service writes itself."""

    detail: str
    errors: list[ErrorItem] = []


class TextSearch(BaseModel):
    """Search with a text."""

    text: str = Field(min_length=1, max_length=10_000, description="the query text")
    k: int = Field(10, ge=1, description="how many hits (at most the server's max_k)")
    target: Target = Field("image", description="search the image index or the text index")


class Hit(BaseModel):
    """One result: the item, its Hamming distance to the query and its metadata."""

    id: int | str
    distance: int
    text: str
    image_url: str
    fields: dict[str, Any] = Field({}, description="the user's fields given at build time")


class SearchResponse(BaseModel):
    """Ranked hits, nearest first (ties in index order)."""

    target: Target
    k: int
    n_bits: int
    generation: str = Field(description="the store commit the search read")
    no_known_words: bool = Field(False, description="text query: none of its words is known")
    hits: list[Hit]


class BuildItem(BaseModel):
    """One pair to index: an id, its text and its image (base64 bytes or a server-side path)."""

    id: UserId
    text: str = Field(min_length=1, max_length=10_000)
    image_base64: str | None = Field(None, description="the image file's bytes, base64")
    image_path: str | None = Field(None, description="a path inside the server's data folder")
    fields: dict[str, Any] = Field({}, description="the user's own fields, returned with hits")

    @model_validator(mode="after")
    def _one_image(self) -> BuildItem:
        if (self.image_base64 is None) == (self.image_path is None):
            raise ValueError("expected exactly one of image_base64 and image_path")
        return self


class DatasetSource(BaseModel):
    """A dataset root inside the server's data folder, loaded with the named loader."""

    name: Literal["demo", "web-news", "pairs"]
    root: str = Field(min_length=1, description="path relative to the server's data folder")


class BuildRequest(BaseModel):
    """Build or extend the indexes from items or from a dataset root (one of the two)."""

    items: list[BuildItem] | None = None
    dataset: DatasetSource | None = None
    on_conflict: OnConflict = Field(
        "error", description="an id already indexed: refuse the batch, or replace the item"
    )

    @model_validator(mode="after")
    def _one_source(self) -> BuildRequest:
        if (self.items is None) == (self.dataset is None):
            raise ValueError("expected exactly one of items and dataset")
        if self.items is not None and not self.items:
            raise ValueError("expected at least one item")
        return self


class JobAccepted(BaseModel):
    """A build accepted as a background job."""

    job_id: str
    status_url: str


class JobStatus(BaseModel):
    """A build job's state, progress and per-item errors."""

    job_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    done: int
    total: int
    added: int = 0
    detail: str = ""
    errors: list[ErrorItem] = []
    skipped: list[str] = Field(
        [],
        description="dataset pairs not added (rejected by the loader, undecodable, or already "
        "indexed), with reasons",
    )
    generation: str | None = Field(None, description="the store commit that made the job's items")


class DeleteResponse(BaseModel):
    """What a delete removed."""

    id: int | str
    removed: bool
    generation: str


class IndexStats(BaseModel):
    """What is being served."""

    items: int
    n_bits: int
    generation: str
    segments: int = Field(description="parts the store searches (segments and the growing part)")
    image_backbone: str
    checkpoint_dataset: str
    vocabulary_size: int
    device: str
