"""Request and response bodies. Bounds live here: most bad input is a 422 before our code runs.

Over 400 lines because these are every body of the API, each model short, with the id and
filter value types they share.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    StringConstraints,
    WithJsonSchema,
    computed_field,
    field_validator,
    model_validator,
)

from common.errors import InputError
from common.fields import MAX_FIELDS_BYTES, MAX_FIELDS_DEPTH
from indexes.codes import MAX_BITS
from store import filters
from store.filters import Filter
from store.ids import DOT_SEGMENTS, MAX_ID_CHARS, MAX_INT_ID, ItemId, parse_id

Target = Literal["image", "text"]
# What a build does with an id already indexed, one word the same in the CLI and over HTTP:
# refuse (the batch, or a dataset before anything is written), skip it, or replace the item.
BuildConflict = Literal["error", "skip", "replace"]
# How hits are ranked: by Hamming distance between codes, or by the inner product of the
# query's real hash-layer output with each code (indexes/asymmetric.py; docs/search-api.md).
Scoring = Literal["hamming", "asymmetric"]
DEFAULT_SCORING: Scoring = "asymmetric"  # higher MAP in every case measured (issue 32)
MAX_RANK = 10_000  # offset + k: the deepest rank a search may reach
MAX_BATCH_QUERIES = 32  # queries in one batch text search


def _item_id(value: object) -> ItemId:
    if isinstance(value, float) and value.is_integer():  # JSON Schema: 5.0 is the integer 5
        value = int(value)
    try:
        return parse_id(value)
    except InputError as err:  # pydantic turns a ValueError into a 422 naming the field
        raise ValueError(str(err)) from None


def _json_int(value: object) -> object:
    """A JSON Schema integer: 5 or 5.0, never true or "5" (pydantic's lax mode takes both)."""
    if isinstance(value, bool | str):
        kind = "a boolean" if isinstance(value, bool) else "a string"
        raise ValueError(f"expected an integer, got {kind}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_json_int)]


# An integer (0..2**63-1) or a string of 1..256 characters (not "." or ".."); "5" and 5 are the
# same id.
USER_ID_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "integer", "format": "int64", "minimum": 0, "maximum": MAX_INT_ID},
            {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_ID_CHARS,
                "pattern": "^[^\\u0000-\\u001f\\u007f]*$",
                "not": {"enum": list(DOT_SEGMENTS)},
            },
        ],
        "description": "an integer, or a string without control characters other than '.' and '..'",
    }
)
UserId = Annotated[int | str, BeforeValidator(_item_id), USER_ID_SCHEMA]


class CommitNamed(BaseModel):
    """A response that names a store commit as `commit`, and as `generation`, its name before
    (deprecated, kept for one release: the same value)."""

    commit: str | None

    @computed_field(  # type: ignore[prop-decorator]  # pydantic's documented way
        # Deprecated in the schema only: pydantic's `deprecated=` warns on every response.
        json_schema_extra={"deprecated": True},
        description="the same as `commit`: renamed, and removed in the next release",
    )
    @property
    def generation(self) -> str | None:
        return self.commit

    @model_validator(mode="before")
    @classmethod
    def _from_generation(cls, data: Any) -> Any:
        """Records written before the rename (job files) name it `generation`."""
        if isinstance(data, dict) and "commit" not in data and "generation" in data:
            return {**data, "commit": data["generation"]}
        return data


class ErrorItem(BaseModel):
    """One failed item of a batch."""

    index: int = Field(description="position of the item in the request's list (or -1)")
    id: int | str | None = None
    reason: str


class ErrorBody(BaseModel):
    """The one error shape of every 4xx/5xx this service writes itself."""

    detail: str
    errors: list[ErrorItem] = []


FieldName = Annotated[str, StringConstraints(min_length=1, max_length=filters.MAX_FIELD_CHARS)]


def _filter_value(value: object) -> bool | int | float | str:
    """A filter value as given: "5" stays a string and true a boolean (a filter compares JSON
    values by type); the store checks lengths and finiteness (store.filters), naming the field."""
    if isinstance(value, bool | int | float | str):
        return value
    kind = "null" if value is None else "an object" if isinstance(value, dict) else "a list"
    raise ValueError(f"expected a string, number or boolean, got {kind}")


# One validator, not a union of strict types: a union's error named its last member ("equals.a.
# bool: Input should be a valid boolean" for a string too long or a NaN).
FilterValue = Annotated[
    bool | int | float | str,
    PlainValidator(_filter_value),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "maxLength": filters.MAX_VALUE_CHARS},
                {"type": "number"},
                {"type": "boolean"},
            ],
            "description": "a string, number or boolean",
        }
    ),
]


class SearchFilter(BaseModel):
    """Which items a search may return: every condition given must hold (an AND).

    Values compare as JSON values: 5 and 5.0 are one number, true is not 1, "5" is not 5. A
    field whose value is a list matches when one of its elements does (as Milvus's
    ARRAY_CONTAINS): {"tags": ["news", "2024"]} passes equals {"tags": "news"}. Objects, null
    and lists inside lists never match. At most 16 field conditions in all (equals and in); a
    filter without conditions keeps every item.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    equals: dict[FieldName, FilterValue] = Field(
        {},
        max_length=filters.MAX_CLAUSES,
        description="field -> value: the item's field is that value, or a list that contains "
        "it (ARRAY_CONTAINS)",
    )
    in_: dict[
        FieldName,
        Annotated[list[FilterValue], Field(min_length=1, max_length=filters.MAX_VALUES)],
    ] = Field(
        {},
        alias="in",
        max_length=filters.MAX_CLAUSES,
        description=f"field -> 1..{filters.MAX_VALUES} values: the item's field is one of "
        "them, or a list that contains one (ARRAY_CONTAINS_ANY)",
    )
    ids: Annotated[list[UserId], Field(max_length=filters.MAX_IDS)] | None = Field(
        None,
        description=f"at most {filters.MAX_IDS} user ids: only these items (an empty list "
        "keeps none)",
    )
    _value: Filter = PrivateAttr()

    @model_validator(mode="after")
    def _checked(self) -> SearchFilter:
        try:
            self._value = Filter.of(equals=self.equals, any_of=self.in_, ids=self.ids)
        except InputError as err:  # the store's own checks (at most MAX_CLAUSES in all)
            raise ValueError(str(err)) from None
        return self

    @property
    def value(self) -> Filter | None:
        """The store's filter, or None when it keeps every item (an unfiltered search)."""
        return None if self._value.keeps_all else self._value


SCORING_DESCRIPTION = (
    "hamming: by Hamming distance between the query's code and each item's code; asymmetric: "
    "by the inner product of the query's real hash-layer output (before sign) with each code "
    "(the stored codes stay binary)"
)
OFFSET_DESCRIPTION = (
    "skip this many hits: ranks offset..offset+k-1 of the same ranking; at most "
    f"{MAX_RANK} - max_k, so that offset + k <= {MAX_RANK}"
)
MAX_DISTANCE_DESCRIPTION = (
    "only hits whose Hamming distance to the query's code is at most this (k is the cap), "
    f"under either scoring; {MAX_BITS} or more (the longest code) keeps every hit"
)


class TextSearch(BaseModel):
    """Search with a text."""

    text: str = Field(min_length=1, max_length=10_000, description="the query text")
    k: JsonInt = Field(10, ge=1, description="how many hits (at most the server's max_k)")
    target: Target = Field("image", description="search the image index or the text index")
    filter: SearchFilter | None = Field(
        None, description="search only among the items that pass (the exact top-k of those)"
    )
    scoring: Scoring = Field(DEFAULT_SCORING, description=SCORING_DESCRIPTION)
    # The service states its own bound, MAX_RANK - max_k (service/app.py stated_limits).
    offset: JsonInt = Field(0, ge=0, le=MAX_RANK - 1, description=OFFSET_DESCRIPTION)
    max_distance: int | None = Field(None, ge=0, description=MAX_DISTANCE_DESCRIPTION)

    # JsonInt's check, as a validator: inside a union its schema loses the bound (pydantic).
    _integer = field_validator("max_distance", mode="before")(_json_int)


class TextBatch(BaseModel):
    """Several text searches in one request, each answered as the single search would be."""

    queries: list[TextSearch] = Field(
        min_length=1, max_length=MAX_BATCH_QUERIES, description="the searches, in order"
    )


class Hit(BaseModel):
    """One result: the item, how close it is to the query and its metadata."""

    id: int | str
    distance: int = Field(description="Hamming distance between the query's code and the item's")
    score: float = Field(
        description="what the hits are ranked by, higher first: the cosine of the query and "
        "the item's code (hamming: 1 - 2 distance / n_bits; asymmetric: the query's real "
        "output times the code, over sqrt(n_bits))"
    )
    text: str
    image_url: str
    fields: dict[str, Any] = Field({}, description="the user's fields given at build time")


class SearchResponse(CommitNamed):
    """Ranked hits, best first (ties in index order)."""

    target: Target
    k: int
    offset: int = Field(0, description="the rank of the first hit (0: the best)")
    scoring: Scoring
    n_bits: int
    commit: str = Field(description="the store commit the search read")
    no_known_words: bool = Field(
        False, description="text query: none of its words is known, so it has no hits"
    )
    used_words: list[str] | None = Field(
        None, description="text query: the vocabulary words its code is made of"
    )
    unknown_words: list[str] | None = Field(
        None, description="text query: its words the model ignored (unknown, or stop words)"
    )
    message: str | None = Field(None, description="why there are no hits, when none is found")
    hits: list[Hit]


class SuggestedWords(BaseModel):
    """Words to try in a text search: from the served model's vocabulary, frequent and
    informative in the collection it serves."""

    words: list[str]


class BatchResponse(BaseModel):
    """One answer per query of a batch, in order."""

    results: list[SearchResponse]


def exactly_one(**types: str) -> dict[str, Any]:
    """The JSON Schema of "exactly one of these keys is given, and not null" (a oneOf)."""
    return {
        "oneOf": [
            {"required": [key], "properties": {key: {"type": json_type}}}
            for key, json_type in types.items()
        ]
    }


class BuildItem(BaseModel):
    """One pair to index: an id, its text and its image (base64 bytes or a server-side path)."""

    # The schema states the rule `_one_image` enforces.
    model_config = ConfigDict(
        json_schema_extra=exactly_one(image_base64="string", image_path="string")
    )

    # Checked by service/indexing.py's validate_items, the one place build items are checked,
    # so that every bad item is in the one 400 that lists them; the schema states the rules.
    id: Annotated[Any, USER_ID_SCHEMA]
    text: str = Field(json_schema_extra={"minLength": 1, "maxLength": 10_000})
    image_base64: str | None = Field(None, description="the image file's bytes, base64")
    image_path: str | None = Field(None, description="a path inside the server's data folder")
    fields: dict[str, Any] = Field(
        {},
        description=(
            "the user's own fields, returned with hits: a JSON object of at most "
            f"{MAX_FIELDS_BYTES} bytes, nested at most {MAX_FIELDS_DEPTH} levels (the object "
            "itself is level 1)"
        ),
    )

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
    """Build or extend the indexes from items or from a dataset root (exactly one of the two)."""

    # The schema states the rule `_one_source` enforces.
    model_config = ConfigDict(json_schema_extra=exactly_one(items="array", dataset="object"))

    items: Annotated[list[BuildItem], Field(min_length=1)] | None = Field(
        None, description="the pairs to index (at most the server's max_batch_items)"
    )
    dataset: DatasetSource | None = Field(
        None, description="a dataset inside the server's data folder, streamed into the index"
    )
    on_conflict: BuildConflict | None = Field(
        None,
        description="an id already indexed: error (refuse the batch, or the dataset before "
        "anything is written), skip (leave the stored item, named in the job's `skipped`) or "
        "replace the item; default error for items, skip for a dataset (so running a dataset "
        "build again resumes it)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> BuildRequest:
        if (self.items is None) == (self.dataset is None):
            raise ValueError("expected exactly one of items and dataset")
        return self


class JobAccepted(BaseModel):
    """A build accepted as a background job."""

    job_id: str
    status_url: str


class JobStatus(CommitNamed):
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
    commit: str | None = Field(None, description="the store commit that made the job's items")
    committed: list[int | str] = Field(
        [],
        description="a failed job's partial outcome: the ids of its last batch that the store "
        "holds as given (found when the job stopped between writing them and recording it)",
    )


class DeleteResponse(CommitNamed):
    """What a delete removed."""

    id: int | str
    removed: bool
    commit: str


class VersionStats(BaseModel):
    """One version of the artifacts folder (store/versions.py)."""

    name: str = Field(description="v1, v2, ...")
    current: bool = Field(description="whether it is the one served")
    state: str = Field(description="ready, building (a reindex not finished) or empty")
    source: str | None = Field(description="the version it was reindexed from")
    disk_bytes: int = Field(
        description="its model and store files; images are hard links shared between versions "
        "and are not counted"
    )


class ReloadRequest(BaseModel):
    """Which version to switch to."""

    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(
        None,
        description="v1, v2, ... (a rollback names an older one); default: the newest ready "
        "version after the served one",
        pattern=r"^v[1-9][0-9]{0,8}$",
    )


class CaughtUp(BaseModel):
    """The switch's last pass, made while every writer of the old store waited."""

    copied: int
    deleted: int
    seconds: float


class ReloadResponse(BaseModel):
    """A switch that happened: every request from now on is answered by `version`."""

    version: str
    previous: str
    caught_up: CaughtUp
    seconds: float = Field(description="the whole switch, the loading of the new version included")


class IndexStats(CommitNamed):
    """What is being served."""

    version: str = Field(description="the served version of the artifacts folder")
    versions: list[VersionStats] = Field(description="every version, oldest first")
    items: int
    n_bits: int
    commit: str
    segments: int = Field(description="parts the store searches (segments and the growing part)")
    image_backbone: str
    checkpoint_dataset: str
    vocabulary_size: int
    device: str
