"""Indexing: build items and dataset pairs -> codes -> the store; one path for HTTP and CLI.

An item batch (a build request's `items`) succeeds or fails as a whole: every item is validated
first (ids, texts, images decoded under the size and pixel limits), and any failure leaves the
store as it was. A dataset is streamed in chunks of CHUNK pairs (read, decode, encode, commit),
so memory is bounded by the chunk whatever the dataset's size; ids already in the store are
skipped (reported in `skipped`), which makes an interrupted build resumable by running it again.

A dataset build from HTTP names a data folder: every image file a record names must resolve
inside it (an absolute path, `..` or a symlink out is skipped with the reason, never read). A pair
whose id or caption the store cannot hold is skipped too, so one bad record never fails a chunk.
Decoded images wait for the backbone in groups of at most FEATURE_BATCH images and about the
decode budget's pixels (uploads.DECODES), so a build of large photos holds bounded memory.

Over 400 lines because the one validation of build items and the two build paths (an items
batch, a streamed dataset) share their checks, their encoding and their journalled commit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from common.errors import InputError
from common.fields import fields_json
from indexes.codes import n_words
from models.data.dataset import PairDataset
from service.encoder import Encoder
from service.jobs import Entry, JobInterrupted
from service.schemas import BuildConflict, BuildItem, ErrorItem, JobStatus
from service.uploads import DECODES, PixelBudget, decode_image, inside, read_inside
from store.backend import ItemStore
from store.filters import checked_terms
from store.ids import ItemId, parse_id
from store.rows import IMAGES_DIR, NewItems

logger = logging.getLogger(__name__)

FEATURE_BATCH = 32  # images per backbone call
MAX_TEXT_CHARS = 10_000  # of a caption (BuildItem states it in the schema)

CHUNK = 256  # dataset pairs in memory at once
Progress = Callable[[int, int], None]


class BuildFailed(InputError):
    """A batch that failed validation: the message, and one entry per bad item."""

    def __init__(self, message: str, errors: list[ErrorItem]) -> None:
        super().__init__(message)
        self.errors = errors


@dataclass
class Pending:
    """A validated item: its id, text, image bytes and extension, and the user's fields."""

    id: ItemId
    text: str
    data: bytes
    extension: str
    fields: dict[str, Any] = field(default_factory=dict)


class Journal(Protocol):
    """Where a build notes each batch around its commit (service/jobs.py's JobProgress: the
    job's record), so that its outcome can be settled from the store if it stops between."""

    def committing(self, entries: list[Entry], *, final: JobStatus | None = None) -> None:
        """Before a commit: the batch, and the job's outcome should it be the last batch."""

    def committed(self, added: int, commit: int) -> None:
        """After a commit: the items added so far, and the commit."""

    def stopping(self) -> bool:
        """Whether to stop at the end of the current batch (JobInterrupted)."""
        return False


def succeeded(added: int, skipped: list[str], commit: int | None) -> JobStatus:
    """What a build job reports when everything it set out to add is committed."""
    named = None if commit is None else str(commit)
    return JobStatus(
        job_id="",
        status="succeeded",
        done=added,
        total=added,
        added=added,
        skipped=skipped,
        commit=named,
    )


def content_digest(text: str, fields: dict[str, Any], image_sha256: str) -> str:
    """One item's content as the store keeps it (caption, fields JSON, image bytes' SHA-256)."""
    joined = "\0".join((text, fields_json(fields), image_sha256))
    return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()


def held_as_given(store: ItemStore, entries: list[Entry]) -> list[ItemId]:
    """The ids of entries (id, content_digest) that the store holds with that content: how a
    job that stopped between a commit and its record is settled (service/jobs.py)."""
    found: list[ItemId] = []
    for item_id, digest in entries:
        item = store.get(item_id)
        if item is None:
            continue
        image_sha256 = item.image.removeprefix(f"{IMAGES_DIR}/").split(".")[0]
        if content_digest(item.text, item.fields, image_sha256) == digest:
            found.append(item.id)
    return found


@dataclass(frozen=True)
class DatasetOutcome:
    """What a dataset build did: items added, and pairs skipped with the reason."""

    added: int
    skipped: list[str]
    commit: int


def dataset_ids(data: PairDataset) -> list[ItemId]:
    """Store ids for a dataset's pairs.

    The benchmark layouts (demo, Web News) name pairs by numbers, which are indexed as integers
    (leading zeros dropped, as they always were); `pairs` ids are the user's, canonicalised.
    """
    return [dataset_id(data.name, i) for i in data.ids]


def dataset_id(name: str, raw: str) -> ItemId:
    """The store id of one pair of dataset `name` (see `dataset_ids`); InputError when invalid."""
    if name != "pairs" and raw.isascii() and raw.isdigit():
        return int(raw)
    return parse_id(raw)


def check_fields(fields: dict[str, Any]) -> None:
    """User fields the store can hold: the limits of common/fields.py and of their filter terms
    (store.filters.MAX_TERMS_BYTES), checked before a job is accepted or a pair is read."""
    fields_json(fields)
    checked_terms(fields)


def check_text(text: str) -> None:
    """A caption the store can hold: 1..MAX_TEXT_CHARS characters, not only spaces, valid
    Unicode (no lone surrogate), no NUL; else InputError."""
    if not text.strip():
        raise InputError(
            "expected a text, got an empty one" if not text else "expected a text, got only spaces"
        )
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"expected a text of at most {MAX_TEXT_CHARS} characters, got {len(text)}")
    if "\0" in text:
        raise InputError("expected a text without NUL characters, got one")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            f"expected a text of valid Unicode, got a lone surrogate at {err.start}"
        ) from None


class Indexer:
    """Validates, encodes and commits build items to the store."""

    def __init__(
        self, *, store: ItemStore, encoder: Encoder, max_pixels: int, budget: PixelBudget = DECODES
    ) -> None:
        self.store = store
        self.encoder = encoder
        self.max_pixels = max_pixels
        self.budget = budget  # decodes in progress; also caps the pixels of one group

    def _decode(self, data: bytes) -> tuple[Image.Image, str]:
        """decode_image with this indexer's pixel limit and budget, drafted for its backbone."""
        return decode_image(
            data,
            max_pixels=self.max_pixels,
            budget=self.budget,
            min_side=self.encoder.backbone.draft_min_side,
        )

    def validate_items(
        self,
        items: list[BuildItem],
        *,
        data_dir: Path | None,
        max_image_bytes: int,
        on_conflict: BuildConflict,
    ) -> tuple[list[Pending], list[str]]:
        """Check every item, the one place build items are validated (id, text, fields, image);
        raises BuildFailed listing each bad one, else (the pending items, the ids skipped as
        already indexed with on_conflict "skip")."""
        errors: list[ErrorItem] = []
        pending: list[Pending] = []
        skipped: list[str] = []
        seen: set[ItemId] = set()
        ids: list[ItemId | None] = []
        for item in items:
            try:
                ids.append(parse_id(item.id))
            except InputError:
                ids.append(None)
        present = (
            set()
            if on_conflict == "replace"
            else self.store.existing([i for i in ids if i is not None])
        )
        for index, (item, item_id) in enumerate(zip(items, ids, strict=True)):
            shown = item_id if item_id is not None else _shown_id(item.id)
            try:
                if item_id is None:
                    parse_id(item.id)  # raises, saying what is wrong with it
                    raise AssertionError("unreachable")
                if item_id in seen:
                    raise InputError(f"expected unique ids, got id {item_id!r} twice in this batch")
                seen.add(item_id)
                if item_id in present and on_conflict == "error":
                    raise InputError(
                        f"expected a new id, got {item_id!r}: already indexed (on_conflict "
                        "skip leaves it as it is, replace replaces it)"
                    )
                check_text(item.text)
                check_fields(item.fields)
                data = _image_bytes(item, data_dir, max_image_bytes)
                _, extension = self._decode(data)
                if item_id in present:  # on_conflict "skip", once it is known to be valid
                    skipped.append(f"{item_id}: already indexed")
                    continue
                pending.append(Pending(item_id, item.text, data, extension, dict(item.fields)))
            except InputError as err:
                errors.append(ErrorItem(index=index, id=shown, reason=str(err)))
        if errors:
            raise BuildFailed(f"{len(errors)} of {len(items)} items are invalid", errors)
        return pending, skipped

    def add(
        self,
        pending: Sequence[Pending],
        progress: Progress,
        *,
        on_conflict: BuildConflict,
        journal: Journal | None = None,
    ) -> int:
        """Encode pending items and commit them to the store in one write; the commit number.

        With a `journal`, the batch is noted there before the commit and after it.
        """
        image_codes: list[np.ndarray] = []
        group: list[Image.Image] = []
        for done, p in enumerate(pending, start=1):
            group.append(self._decode(p.data)[0])
            if self._full(group) or done == len(pending):
                image_codes.append(self._image_codes(group))
                group = []
                progress(done, len(pending))
                if journal is not None and journal.stopping():  # all or nothing: nothing yet
                    raise JobInterrupted("stopped before its batch was committed")
        final = succeeded(len(pending), [], None)
        return self._commit(
            pending, image_codes, on_conflict=on_conflict, journal=journal, added=0, final=final
        )

    def _full(self, group: list[Image.Image]) -> bool:
        """Whether a group of decoded images should go through the backbone now."""
        pixels = sum(im.width * im.height for im in group)
        return len(group) >= FEATURE_BATCH or pixels >= self.budget.limit

    def _image_codes(self, images: list[Image.Image]) -> np.ndarray:
        """(n, words) packed codes of decoded images (dropped right after by the caller)."""
        return self.encoder.encode_image_features(self.encoder.image_features(images))

    def _commit(
        self,
        pending: Sequence[Pending],
        image_codes: list[np.ndarray],
        *,
        on_conflict: BuildConflict,
        journal: Journal | None,
        added: int,
        final: JobStatus | None,
    ) -> int:
        """Commit one batch (`added` items were committed before it), noted in the journal."""
        text_codes, _ = self.encoder.encode_texts([p.text for p in pending])
        empty = np.empty((0, n_words(self.encoder.n_bits)), np.uint64)
        batch = NewItems(
            ids=[p.id for p in pending],
            texts=[p.text for p in pending],
            images=[""] * len(pending),
            image_codes=np.concatenate(image_codes) if image_codes else empty,
            text_codes=text_codes,
            fields=[p.fields for p in pending],
            image_data=[(p.data, p.extension) for p in pending],
        )
        if journal is not None:
            entries = [
                (p.id, content_digest(p.text, p.fields, hashlib.sha256(p.data).hexdigest()))
                for p in pending
            ]
            journal.committing(entries, final=final)
        commit = self.store.add(
            batch, on_conflict="replace" if on_conflict == "replace" else "error"
        )
        if journal is not None:
            journal.committed(added + len(pending), commit)
        return commit

    def add_dataset(
        self,
        data: PairDataset,
        progress: Progress,
        *,
        on_conflict: BuildConflict,
        within: Path | None = None,
        journal: Journal | None = None,
    ) -> DatasetOutcome:
        """Stream a dataset of image files into the store, CHUNK pairs at a time.

        Only the pairs the source marks for search are indexed (`indexed_idx`): a pairs line of
        split "query" (evaluation only) or "train" (training only) is skipped, saying so. Each
        image file is read and decoded once: groups of decoded images (see `_full`) go
        through the backbone and are dropped; a chunk's raw bytes wait for its commit. With
        `within` (the server's data folder), a file that resolves outside it is skipped unread.
        """
        if data.image_paths is None or data.texts is None:
            raise InputError(f"expected raw images and texts in {data.name}, got features")
        paths, texts, extra = data.image_paths, data.texts, data.extra
        skipped = [f"{r.pair}: {r.reason}" for r in data.rejected]
        ids: dict[int, ItemId] = {}  # pair index -> store id, for the pairs that have a valid one
        searched = np.ones(len(data.ids), dtype=bool)  # what searches may find
        if data.indexed_idx is not None:
            searched[:] = False
            searched[data.indexed_idx] = True
        queries = set(data.query_idx.tolist())
        for i, raw_id in enumerate(data.ids):
            if not searched[i]:  # a pairs line of split "query" or "train"
                said = "an evaluation query" if i in queries else "for training only"
                skipped.append(f"{printable_id(raw_id)}: not indexed: its split says {said}")
                continue
            try:
                ids[i] = dataset_id(data.name, raw_id)
            except InputError as err:
                skipped.append(f"{printable_id(raw_id)}: {err}")
        todo = list(ids)
        if on_conflict != "replace":
            present = self.store.existing(list(ids.values()))
            if present and on_conflict == "error":
                shown = sorted(map(str, present))[:10]
                raise InputError(
                    f"expected only new ids (on_conflict error), got {len(present)} already "
                    f"indexed, among them {shown}: on_conflict skip adds the others, replace "
                    "replaces them"
                )
            skipped += [f"{ids[i]}: already indexed" for i in todo if ids[i] in present]
            todo = [i for i in todo if ids[i] not in present]
        added, commit = 0, self.store.view().commit
        progress(0, len(todo))
        stopped = False
        for start in range(0, len(todo), CHUNK):
            pending: list[Pending] = []
            image_codes: list[np.ndarray] = []
            group: list[Image.Image] = []
            chunk = todo[start : start + CHUNK]
            for n, i in enumerate(chunk, start=1):
                fields = dict(extra[i]) if extra is not None else {}
                try:
                    check_text(texts[i])
                    check_fields(fields)
                    path = paths[i] if within is None else inside(within, str(paths[i]))
                    raw = path.read_bytes()
                    image, extension = self._decode(raw)
                except (InputError, OSError) as err:
                    why = err.strerror if isinstance(err, OSError) and err.strerror else err
                    skipped.append(f"{ids[i]}: {printable_id(paths[i].name)}: {why}")
                else:
                    group.append(image)
                    pending.append(Pending(ids[i], texts[i], raw, extension, fields))
                if group and (self._full(group) or n == len(chunk)):
                    image_codes.append(self._image_codes(group))
                    group = []
                if n % FEATURE_BATCH == 0 or n == len(chunk):
                    progress(start + n, len(todo))
                if not group and journal is not None and journal.stopping():
                    stopped = True  # what is encoded is committed, then the build stops
                    break
            if pending:
                last = not stopped and start + CHUNK >= len(todo)
                final = succeeded(added + len(pending), list(skipped), None) if last else None
                commit = self._commit(
                    pending,
                    image_codes,
                    on_conflict=on_conflict,
                    journal=journal,
                    added=added,
                    final=final,
                )
                added += len(pending)
            if stopped:
                raise JobInterrupted(f"stopped after adding {added} of {len(todo)} items")
        logger.info("dataset %s: %d added, %d skipped", data.name, added, len(skipped))
        return DatasetOutcome(added, skipped, commit)


def _shown_id(value: object) -> int | str | None:
    """An id as an error item can show it (the value the client sent, if it is one)."""
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


def printable_id(text: str) -> str:
    """A name from a dataset, shown with its odd characters (control, lone surrogates) escaped."""
    return text if text.isprintable() else repr(text)[1:-1]


def _image_bytes(item: BuildItem, data_dir: Path | None, max_image_bytes: int) -> bytes:
    if item.image_base64 is not None:
        try:
            data = base64.b64decode(item.image_base64, validate=True)
        except (binascii.Error, ValueError) as err:
            raise InputError(f"expected base64 image bytes, got: {err}") from None
    elif data_dir is None:
        raise InputError("expected image_base64: image_path needs CMH_SERVER_DATA_DIR")
    else:
        data = read_inside(data_dir, item.image_path or "", max_bytes=max_image_bytes)
    if len(data) > max_image_bytes:
        raise InputError(f"expected an image of at most {max_image_bytes} bytes, got {len(data)}")
    return data
