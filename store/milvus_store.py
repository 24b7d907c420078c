"""MilvusStore: the store's interface over one Milvus collection, the system of record.

With CMH_INDEX_BACKEND=milvus the API process keeps no codes and no metadata between requests:
every add, delete, get and search goes to one long-lived collection (CMH_MILVUS_COLLECTION,
default `cmh_items`), so several `cmh serve` processes, on one host or several, share one index.

Collection layout (one row per item):
  id          VARCHAR primary key: str(id) for an integer id, "s" + hex(UTF-8) for a string id
              (store/ids.py: a string of canonical digits is always the integer, so the mapping
              is one to one, and a key holds only [0-9a-fs]: nothing to escape in `id in [...]`)
  seq         INT64 insertion sequence: the tie order of every search (see "Sequence")
  image_code, text_code   BINARY_VECTOR, BIN_FLAT + HAMMING: exact; the byte layout and the
              exact tie handling of indexes/milvus.py (exact_top_k)
  text, image, added      the caption, the image reference (artifacts-relative), the added time
  fields      JSON: the user's fields as given
  terms       JSON {"t": [...]}: hex(UTF-8) of each of the item's filter terms (store/filters.py
              terms_of), which filters match with json_contains (not an ARRAY field:
              milvus-lite 2.5.1 fails every query of an empty collection that has one)
The collection's description holds the manifest (bits, backbone, vocabulary and checkpoint
digests) and a store id, as JSON; `open` checks it with check_manifest and refuses a mismatch
with one line.

Filters: a clause is json_contains(terms["t"], "hex term") ORed over its terms, and an ids list
is `id in [keys]`, ANDed, each as a balanced tree (Milvus refuses a chain past 50 operands).
Every literal in an expression is hex or a key made above, never a user's text, so no value can
change the expression (milvus-lite 2.5.1 refuses pymilvus's filter_params templates, which is
why values are not passed that way). The terms are those of the local store, so the same filter
keeps the same items on both backends (5 and 5.0 alike, true is not 1), every one of them
stored: an item whose terms would pass the JSON field's 64 KiB is refused at build time on both
backends (store.filters.MAX_TERMS_BYTES).

Sequence: seq = (max(now in units of 1.024 us, last + 1) << 10) | tag, tag a random 10-bit number
per opened store. It increases within a process, and across processes it follows the writes'
wall-clock order (as far as the hosts' clocks agree); the tag keeps two processes' seqs apart
even within one tick. Ties are in this order: insertion order as the clocks saw it.

Consistency: Strong, so a write acknowledged through one process is meant to be visible to the
next search through any other (the two-process tests check it). Measured on milvus-lite 2.5.1
(`cmh bench writes --backend milvus`): so at 300k items, but at 1M another connection's first
get missed 12 of 20 fresh adds and found each on the next, within 5.6 ms of the acknowledgement.
Writes are upserts of at most WRITE_BATCH rows per call: one build request (at most
CMH_MAX_BATCH_ITEMS items, 1,000 by default) is one call, all or nothing; a larger offline batch
that fails part-way may leave its first calls written, and is re-run with on_conflict="replace".
Two processes adding the same new id at the same moment both succeed (last upsert wins): Milvus
has no unique constraint to refuse one.

Failures: every call has a timeout (CMH_MILVUS_TIMEOUT_S); a timeout or an unreachable server is
NotReadyError (503, and /readyz fails), so a write that Milvus did not acknowledge is reported
failed. After `kill -9` of the server and its restart, every acknowledged write is there
(tests/test_milvus_store.py).

Images added through the API are content-addressed files under the artifacts folder, as with
the local store: with several hosts, that folder's images/ must be a shared volume. A delete
removes an image file only when no row refers to it and it was not written in the last
IMAGE_GRACE_S seconds (another process may be adding a row that names it).

Over 400 lines because it is one backend's whole mapping of the store's interface (schema,
manifest, ids, terms, writes, search, errors) onto Milvus.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from common.errors import BackendError, InputError, IntegrityError, NotReadyError
from indexes.asymmetric import Asymmetric, hamming_scores
from indexes.codes import check_packed
from indexes.hamming import check_k
from indexes.milvus import (
    MAX_K,
    TOPK_LIMIT,
    Hit,
    exact_top_k,
    from_milvus_bytes,
    milvus_dim,
    rows_and_vectors,
    search_hits,
    to_milvus_bytes,
)
from store.filters import Filter, terms_of
from store.ids import ItemId, parse_id
from store.manifest import Manifest, check_manifest
from store.metadata import Item
from store.rows import IMAGES_DIR, NewItems, checked_rows, put_image
from store.snapshot import StoredItems, sample_seqs
from store.store import Deleted, Hits, OnConflict
from store.view import Target

logger = logging.getLogger(__name__)

FORMAT = "cmh-store-1"  # the description's format tag
# What a call to Milvus raises when Milvus fails (503, never 500): pymilvus turns most failures
# into MilvusException but re-raises a gRPC deadline (a hung server: connections open, no
# answer) as the grpc.RpcError itself.
MILVUS_FAILURES = (MilvusException, grpc.RpcError)
# What a server that cannot be reached, or does not answer in time, says (pymilvus words it in
# several ways, and gives a retried connection failure a code that is not a number).
_UNREACHABLE = re.compile(r"connect|unavailable|deadline|timeout|timed out|retry run out", re.I)
WRITE_BATCH = 1_000  # rows per upsert call
ID_BATCH = 1_000  # keys per `id in [...]` expression
MAX_KEY_BYTES = 2_049  # "s" + hex of a 256-character id (at most 4 bytes each)
MAX_TEXT_BYTES = 65_535  # Milvus's largest VARCHAR
MAX_IMAGE_BYTES = 4_096  # of an image reference
TAG_BITS = 10  # of a seq, the process tag
IMAGE_GRACE_S = 600.0  # an image file written this recently may be about to be referenced
_STORED_IMAGE = re.compile(rf"{IMAGES_DIR}/[0-9a-f]{{64}}\.[a-z0-9]{{1,5}}")
ITEM_FIELDS = ["seq", "text", "image", "added", "fields"]
SEARCH_ATTEMPTS = 3  # a hit deleted before its row was read: search again
SCAN_BATCH = 4_096  # rows per page of the asymmetric search's last resort, a full read
T = TypeVar("T")
# What a collection opened without an expected manifest has until it is read (open replaces it).
EMPTY_MANIFEST = Manifest(n_bits=8, image_backbone="", vocabulary_sha256="", checkpoint_sha256="",
                          created=0.0)  # fmt: skip


class WriteGuard(Protocol):
    """What a write to a versioned collection checks (store/milvus_versions.py): that its
    version is served and no switch is under way before it writes (StoreRetired otherwise), and
    after, that a switch that began meanwhile has not missed it."""

    def before(self) -> object:
        """StoreRetired unless the collection may take a write now; a token for `after`."""
        ...

    def after(self, token: object) -> None:
        """NotReadyError when the write may have missed a switch that began since `before`."""
        ...


@dataclass(frozen=True)
class Candidates:
    """How many Hamming candidates an asymmetric search asks Milvus for (see _asymmetric_top_k)."""

    first: int = 256  # at least this many at first
    factor: int = 8  # or this many times k, if more
    most: int = TOPK_LIMIT  # past this many (Milvus's limit), every code is read and scored


class _Query(NamedTuple):
    """One query of an asymmetric search."""

    field: str  # the code field searched
    signs: np.ndarray  # (1, n_words) its packed signs
    k: int
    where: Filter | None
    asymmetric: Asymmetric  # its row alone
    radius: int | None


class _Candidate(NamedTuple):
    """One code of an asymmetric search: ordered by weighted distance, then seq."""

    wd: int
    seq: int
    dist: int  # Hamming distance to the query's signs
    key: str  # primary key


def key_of(item_id: ItemId) -> str:
    """The primary key of a canonical id (see the module docstring)."""
    if isinstance(item_id, int):
        return str(item_id)
    return "s" + item_id.encode("utf-8").hex()


def id_of(key: str) -> ItemId:
    """The canonical id of a primary key (key_of's inverse)."""
    return bytes.fromhex(key[1:]).decode("utf-8") if key.startswith("s") else int(key)


def _hex_terms(fields: dict[str, Any]) -> list[str]:
    """The item's filter terms as stored: hex of UTF-8, every one (checked_rows has refused
    fields whose terms pass MAX_TERMS_BYTES, the size of this list as JSON)."""
    return [t.encode("utf-8", "surrogatepass").hex() for t in terms_of(fields)]


def is_refusal(err: Exception) -> bool:
    """Whether Milvus answered with an error about the request itself (an expression it cannot
    run, a value it will not store), not a failure to reach it or to answer in time."""
    if not isinstance(err, MilvusException) or not isinstance(err.code, int):
        return False
    return err.code != 0 and not _UNREACHABLE.search(str(err))


def balanced(operands: list[str], operator: str) -> str:
    """operands joined by `operator` as a balanced tree of parentheses: its depth is log2 of
    their number. Milvus parses `a or b or c ...` as a chain as deep as it is long and refuses
    one past 50 operands (51: "Cannot find field with field_id: 0", 64 and more: "unsupported
    expr proto node"; milvus-lite 2.5.1); a tree of 1,000 is 10 deep."""
    if len(operands) == 1:
        return operands[0]
    middle = len(operands) // 2
    left, right = balanced(operands[:middle], operator), balanced(operands[middle:], operator)
    return f"({left} {operator} {right})"


def expression(where: Filter | None) -> str:
    """The Milvus boolean expression of a filter ("" keeps every item); literals are hex only."""
    if where is None or where.keeps_all:
        return ""
    parts = []
    for clause in where.clauses:
        # One json_contains per term, ORed: milvus-lite 2.5.1's server segfaults, now and then,
        # on json_contains_any with several values (tests/test_milvus_store.py found it), and
        # every time with 1,000.
        terms = [t.encode("utf-8", "surrogatepass").hex() for t in clause.terms]
        parts.append(balanced([f'json_contains(terms["t"], "{t}")' for t in terms], "or"))
    if where.ids is not None:
        keys = ", ".join(f'"{key_of(i)}"' for i in sorted(where.ids, key=str))
        parts.append(f"id in [{keys}]")
    return balanced(parts, "and")


@dataclass(frozen=True)
class MilvusView:
    """What the service reads of a store's state: the last write's seq, the size, no parts."""

    commit: int  # the seq clock at this process's last write (0 before any)
    count: int  # live items in the collection
    parts: tuple[()] = ()  # Milvus manages its own segments


class MilvusStore:
    """A store whose items live in one Milvus collection. Open with MilvusStore.open."""

    def __init__(
        self,
        artifacts: Path,
        client: MilvusClient,
        *,
        collection: str,
        manifest: Manifest,
        store_id: str,
        uri: str,
        timeout_s: float,
        candidates: Candidates = Candidates(),
        guard: WriteGuard | None = None,
        family: str | None = None,
    ) -> None:
        self.artifacts = artifacts
        self.guard = guard
        # The collection of version v1 (store/milvus_versions.py): the others are named after
        # it, and an image file is removed only when no version's collection refers to it.
        self.family = family or collection
        self.candidates = candidates
        self.collection = collection
        self.manifest = manifest
        self.n_bits = manifest.n_bits
        self.store_id = store_id
        self.uri = uri
        self.timeout_s = timeout_s
        # pymilvus bounds its retries by a timeout only when it is an int (decorators.py:
        # `isinstance(_timeout, int)`); a float is ignored and a dead server costs 75 retries
        # (minutes). So every call passes whole seconds.
        self._timeout = max(1, math.ceil(timeout_s))
        self._client = client
        self._tag = random.getrandbits(TAG_BITS)
        self._last_tick = 0
        self._commit = 0

    @classmethod
    def open(
        cls,
        artifacts: Path,
        *,
        uri: str,
        collection: str,
        expected: Manifest | None,
        token: str = "",
        timeout_s: float = 10.0,
        candidates: Candidates = Candidates(),
        guard: WriteGuard | None = None,
        family: str | None = None,
    ) -> MilvusStore:
        """Open (or create) the collection; InputError when it holds codes of another model,
        NotReadyError when Milvus does not answer within timeout_s. `expected` None: open a
        collection that is there with the manifest it holds (a reindex reading its source).
        `guard`: what every write checks before and after (a versioned collection:
        store/milvus_versions.py); `family`: the collection of version v1."""
        try:
            # A private connection: pymilvus shares one per URI, and close() would end it for all.
            client = MilvusClient(
                uri=uri,
                token=token,
                timeout=max(1, math.ceil(timeout_s)),
                alias=f"cmh-{uuid.uuid4().hex}",
            )
        except MILVUS_FAILURES as err:
            raise NotReadyError(f"expected Milvus at {uri} to answer, got: {_short(err)}") from None
        store = cls(
            artifacts,
            client,
            collection=collection,
            manifest=expected or EMPTY_MANIFEST,
            store_id="",
            uri=uri,
            timeout_s=timeout_s,
            candidates=candidates,
            guard=guard,
            family=family,
        )
        try:
            store.store_id = store._call(store._open_collection, expected)
        except BaseException:
            client.close()
            raise
        logger.info("serving Milvus collection %s at %s", collection, uri)
        return store

    def _open_collection(self, expected: Manifest | None) -> str:
        """The collection's store id; creates the collection when it is missing."""
        client, name, t = self._client, self.collection, self._timeout
        if not client.has_collection(name, timeout=t):
            if expected is None:
                raise InputError(f"expected Milvus collection {name!r} at {self.uri}, got none")
            store_id = uuid.uuid4().hex
            self._create(expected, store_id)
            return store_id
        description = client.describe_collection(name, timeout=t).get("description", "")
        try:
            found = json.loads(description)
            if found.get("format") != FORMAT:
                raise ValueError(f"format {found.get('format')!r}")
            manifest = Manifest(**found["manifest"])
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise InputError(
                f"expected Milvus collection {name!r} to be a cmh store ({FORMAT}), got "
                f"description {description[:80]!r} ({err}); name another CMH_MILVUS_COLLECTION"
            ) from None
        if expected is None:
            self.manifest, self.n_bits = manifest, manifest.n_bits
        else:
            check_manifest(manifest, expected)
        client.load_collection(name, timeout=t)
        return str(found.get("store_id", ""))

    def _create(self, manifest: Manifest, store_id: str) -> None:
        description = json.dumps(
            {"format": FORMAT, "manifest": asdict(manifest), "store_id": store_id}
        )
        schema = MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description=description
        )
        dim = milvus_dim(manifest.n_bits)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_KEY_BYTES)
        schema.add_field("seq", DataType.INT64)
        schema.add_field("image_code", DataType.BINARY_VECTOR, dim=dim)
        schema.add_field("text_code", DataType.BINARY_VECTOR, dim=dim)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        schema.add_field("image", DataType.VARCHAR, max_length=MAX_IMAGE_BYTES)
        schema.add_field("added", DataType.DOUBLE)
        schema.add_field("fields", DataType.JSON)
        schema.add_field("terms", DataType.JSON)  # {"t": [hex terms]}
        index_params = self._client.prepare_index_params()
        for field in ("image_code", "text_code"):
            index_params.add_index(field_name=field, index_type="BIN_FLAT", metric_type="HAMMING")
        self._client.create_collection(
            self.collection,
            schema=schema,
            index_params=index_params,
            consistency_level="Strong",
            timeout=self._timeout,
        )
        logger.info("created Milvus collection %s for %d-bit codes", self.collection, dim)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return milvus_call(self.uri, self.timeout_s, fn, *args, **kwargs)

    # ---- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        rows = self._call(
            self._client.query,
            self.collection,
            output_fields=["count(*)"],
            timeout=self._timeout,
        )
        return int(rows[0]["count(*)"])

    def view(self) -> MilvusView:
        """The last write's seq clock and the collection's size, read now."""
        return MilvusView(self._commit, len(self))

    def _rows(self, ids: Sequence[ItemId], fields: list[str]) -> list[dict[str, Any]]:
        """The stored rows of these ids (absent ones left out), with these fields."""
        keys = sorted({key_of(parse_id(i)) for i in ids})
        out: list[dict[str, Any]] = []
        for start in range(0, len(keys), ID_BATCH):
            listed = ", ".join(f'"{k}"' for k in keys[start : start + ID_BATCH])
            out += self._call(
                self._client.query,
                self.collection,
                filter=f"id in [{listed}]",
                output_fields=["id", *fields],
                timeout=self._timeout,
            )
        return out

    def existing(self, ids: Sequence[ItemId]) -> set[ItemId]:
        """Which of ids are stored (as canonical ids)."""
        return {id_of(row["id"]) for row in self._rows(ids, [])}

    def get(self, item_id: ItemId) -> Item | None:
        """The item stored under item_id (5 and "5" alike), or None."""
        rows = self._rows([item_id], ITEM_FIELDS)
        return _item(rows[0]) if rows else None

    def sample_texts(self, n: int) -> list[str]:
        """The texts of at most n stored items (the first Milvus returns)."""
        rows = self._call(
            self._client.query,
            self.collection,
            filter="",
            output_fields=["text"],
            limit=n,
            timeout=self._timeout,
        )
        return [str(row["text"]) for row in rows]

    def search_now(  # the ItemStore interface: every argument unused
        self,
        target: Target,  # noqa: ARG002
        queries: np.ndarray,  # noqa: ARG002
        k: int,  # noqa: ARG002
        *,
        asymmetric: Asymmetric | None = None,  # noqa: ARG002
        radius: int | None = None,  # noqa: ARG002
    ) -> Hits | None:
        """Always None: every search here waits on the Milvus server (see search)."""
        return None

    def search(
        self,
        target: Target,
        queries: np.ndarray,
        k: int,
        *,
        where: Filter | None = None,
        asymmetric: Asymmetric | None = None,
        radius: int | None = None,
    ) -> Hits:
        """Exact top-k of each (m, n_words) query among stored items (that pass `where`), with
        their metadata; ties in seq order. Ranked by Hamming distance, or by `asymmetric`'s
        weighted distance (see "Asymmetric scoring"); with `radius`, only items within that
        Hamming distance of the query."""
        check_packed(queries, self.n_bits, name="queries")
        check_k(k)
        if k > MAX_K:
            raise InputError(f"expected k <= {MAX_K} with the Milvus backend, got {k}")
        if asymmetric is not None:
            return self._search_asymmetric(target, queries, int(k), where, asymmetric, radius)
        found = self._call(
            exact_top_k,
            self._client,
            self.collection,
            to_milvus_bytes(queries, self.n_bits),
            int(k),
            anns_field=f"{target}_code",
            expr=expression(where),
            output_fields=ITEM_FIELDS,
            timeout=self._timeout,
        )
        hits, scores = [], []
        for row in found:
            kept = [hit for hit in row if radius is None or hit.dist <= radius]
            hits.append(
                self._checked([(_item({"id": h.id, **h.entity}), h.dist) for h in kept], where)
            )
            scores.append(hamming_scores(np.array([h.dist for h in kept]), self.n_bits).tolist())
        return Hits(hits, self._commit, scores)

    def _checked(
        self, items: list[tuple[Item, int]], where: Filter | None
    ) -> list[tuple[Item, int]]:
        """The hits, after checking each against the filter with its own stored fields."""
        if where is not None:
            for item, _ in items:
                if not where.matches(item.id, item.fields):
                    raise IntegrityError(
                        f"Milvus returned item {item.id!r}, which does not pass the filter: "
                        f"its terms in {self.collection!r} were changed outside the service"
                    )
        return items

    def _search_asymmetric(
        self,
        target: Target,
        queries: np.ndarray,
        k: int,
        where: Filter | None,
        asymmetric: Asymmetric,
        radius: int | None,
    ) -> Hits:
        """Asymmetric top-k per query from a Hamming candidate set proven large enough."""
        hits, scores = [], []
        for row in range(queries.shape[0]):
            query = _Query(
                f"{target}_code", queries[row : row + 1], k, where,
                asymmetric.rows(row, row + 1), radius,
            )  # fmt: skip
            for _ in range(SEARCH_ATTEMPTS):  # a hit deleted before its row was read: again
                ranked = self._call(self._asymmetric_top_k, query)
                rows = self._rows([id_of(c.key) for c in ranked], ITEM_FIELDS)
                stored = {str(r["id"]): r for r in rows}
                if len(stored) == len(ranked):
                    break
            else:
                raise NotReadyError("expected the hits' rows, got them deleted while searching")
            wd = np.array([[c.wd for c in ranked]], dtype=np.int64)
            hits.append(self._checked([(_item(stored[c.key]), c.dist) for c in ranked], where))
            scores.append(query.asymmetric.scores(wd)[0].tolist())
        return Hits(hits, self._commit, scores)

    def _asymmetric_top_k(self, query: _Query) -> list[_Candidate]:
        """The k best candidates of one query, by (weighted distance, seq).

        Milvus gives the `limit` nearest codes by Hamming distance (those within the radius):
        every other code is at least as far as the last of them, d_last, so its weighted
        distance is at least lower[d_last]. When the k-th best candidate is below that, no other
        code can enter (or tie into) the top-k: exact. Otherwise the limit grows (x4) up to
        `candidates.most` (Milvus's TOPK_LIMIT), and past it every code that passes the filter
        is read and scored (exact, and as slow as a scan over the network).
        """
        vector = to_milvus_bytes(query.signs, self.n_bits)
        plan, k, radius = self.candidates, query.k, query.radius
        limit = min(plan.most, max(plan.first, plan.factor * k))
        lower = query.asymmetric.lower[0]
        while True:
            found = search_hits(
                self._client, self.collection, vector, anns_field=query.field, limit=limit,
                radius=None if radius is None else (0, radius + 1),
                expr=expression(query.where), timeout=self._timeout,
            )[0]  # fmt: skip
            ranked = self._scored(found, query)[:k]
            if len(found) < limit:
                return ranked  # every code within the radius that passes the filter
            if len(ranked) == k and ranked[-1].wd < lower[found[-1].dist]:
                return ranked
            if limit >= plan.most:
                logger.info("asymmetric search past %d candidates: scoring every code", limit)
                return self._scan_all(query)
            limit = min(plan.most, limit * 4)

    def _scored(self, found: list[Hit], query: _Query) -> list[_Candidate]:
        """Candidates of one query ranked by (weighted distance, seq); their codes are read
        by key (milvus-lite 2.5.1 fails a search that asks for a vector field)."""
        keys = [str(hit.id) for hit in found]
        width = milvus_dim(self.n_bits) // 8
        rows: list[dict[str, Any]] = []
        stored: list[np.ndarray] = []
        for start in range(0, len(keys), ID_BATCH):
            listed = ", ".join(f'"{k}"' for k in keys[start : start + ID_BATCH])
            page = self._client.query(
                self.collection,
                filter=f"id in [{listed}]",
                output_fields=["id", query.field],
                timeout=self._timeout,
            )
            page_rows, vectors = rows_and_vectors(page, query.field, width)
            rows += page_rows
            stored.append(vectors)
        row_of = {str(r["id"]): i for i, r in enumerate(rows)}  # key -> its row in `stored`
        hits = [hit for hit in found if str(hit.id) in row_of]  # deleted meanwhile: not there
        if not hits:
            return []
        vectors = np.concatenate(stored)[[row_of[str(h.id)] for h in hits]]
        wd = query.asymmetric.distances(0, from_milvus_bytes(vectors, self.n_bits))
        return sorted(
            _Candidate(w, h.seq, h.dist, str(h.id)) for w, h in zip(wd.tolist(), hits, strict=True)
        )

    def _scan_all(self, query: _Query) -> list[_Candidate]:
        """The k best of every code that passes the filter (and lies within the radius).

        Pages by primary key (`id > last`, in key order) as Milvus's query iterator does, but
        reads each page's codes as one column (indexes.milvus.rows_and_vectors), which the
        iterator, handing its rows over one by one, cannot: half the time at 100,000 codes.
        """
        width = milvus_dim(self.n_bits) // 8
        where = expression(query.where)
        best: list[_Candidate] = []
        last: str | None = None
        while True:
            bounds = [f"({where})"] if where else []
            if last is not None:
                bounds.append(f'id > "{last}"')
            page = self._client.query(
                self.collection,
                filter=" and ".join(bounds),  # keys are [0-9a-fs] only (key_of)
                output_fields=["id", "seq", query.field],
                limit=SCAN_BATCH,
                timeout=self._timeout,
                iterator="True",  # what the query iterator asks: the first rows in key order
                reduce_stop_for_best="True",
            )
            rows, vectors = rows_and_vectors(page, query.field, width)
            if not rows:
                return best
            codes = from_milvus_bytes(vectors, self.n_bits)
            dists = np.bitwise_count(codes ^ query.signs).sum(axis=1)
            wd = query.asymmetric.distances(0, codes)
            seqs = np.array([int(r["seq"]) for r in rows], dtype=np.int64)
            kept = np.flatnonzero(dists <= query.radius) if query.radius is not None else None
            order = np.lexsort((seqs, wd) if kept is None else (seqs[kept], wd[kept]))
            chosen = (order if kept is None else kept[order])[: query.k]
            best = sorted(
                best
                + [
                    _Candidate(int(wd[i]), int(seqs[i]), int(dists[i]), str(rows[i]["id"]))
                    for i in chosen.tolist()
                ]
            )[: query.k]
            # Only an empty page ends it: with reduce_stop_for_best a page may hold fewer rows
            # than asked for while more follow (the iterator, too, reads until one is empty).
            last = str(rows[-1]["id"])

    # ---- writing ---------------------------------------------------------------------------

    def _seqs(self, n: int) -> list[int]:
        """n new increasing seqs (see "Sequence" in the module docstring)."""
        first = max(time.time_ns() >> TAG_BITS, self._last_tick + 1)
        self._last_tick = first + n - 1
        return [((first + i) << TAG_BITS) | self._tag for i in range(n)]

    def add(self, batch: NewItems, *, on_conflict: OnConflict = "error") -> int:
        """Write a batch (acknowledged by Milvus before this returns); the last seq written.

        An id already stored is an InputError, or (on_conflict="replace") its item is replaced
        by the new one, with a new seq.
        """
        rows, to_write = checked_rows(batch, self.n_bits)
        keys = [key_of(i) for i in rows.ids]
        if len(set(keys)) != len(keys):
            seen: set[str] = set()
            for key in keys:
                if key in seen:
                    raise InputError(
                        f"expected unique ids, got id {id_of(key)!r} twice in this batch"
                    )
                seen.add(key)
        old = self._rows(rows.ids, ["image"])
        if old and on_conflict == "error":
            taken = sorted(str(id_of(row["id"])) for row in old)
            raise InputError(f"expected new ids, got {taken[:10]} already indexed")
        for caption in rows.texts:
            if len(caption.encode("utf-8")) > MAX_TEXT_BYTES:
                raise InputError(f"expected texts of at most {MAX_TEXT_BYTES} bytes as UTF-8")
        for relative, source in to_write.items():  # rewritten: its fresh mtime guards it
            put_image(self.artifacts / relative, source)
        fields = [json.loads(f) for f in rows.fields]
        seqs, now = self._seqs(len(keys)), time.time()
        added = list(batch.added) if batch.added is not None else [now] * len(keys)
        self._guarded(
            lambda: self._upsert(keys, seqs, rows.image_codes, rows.text_codes, rows.texts,
                                 rows.images, added, fields)
        )  # fmt: skip
        if seqs:
            self._commit = seqs[-1]
        self._collect_images([row["image"] for row in old])
        return self._commit

    def _guarded(self, write: Callable[[], None]) -> None:
        """A write between the guard's two checks (none without a guard)."""
        token = self.guard.before() if self.guard is not None else None
        write()
        if self.guard is not None:
            self.guard.after(token)

    def _upsert(
        self,
        keys: list[str],
        seqs: list[int],
        image_codes: np.ndarray,
        text_codes: np.ndarray,
        texts: Sequence[str],
        images: Sequence[str],
        added: Sequence[float],
        fields: Sequence[dict[str, Any]],
    ) -> None:
        """Upsert rows, WRITE_BATCH per call (each acknowledged when it returns)."""
        image_vectors = to_milvus_bytes(image_codes, self.n_bits)
        text_vectors = to_milvus_bytes(text_codes, self.n_bits)
        for start in range(0, len(keys), WRITE_BATCH):
            self._call(
                self._client.upsert,
                self.collection,
                [
                    {
                        "id": keys[i],
                        "seq": seqs[i],
                        "image_code": image_vectors[i].tobytes(),
                        "text_code": text_vectors[i].tobytes(),
                        "text": texts[i],
                        "image": images[i],
                        "added": float(added[i]),
                        "fields": fields[i],
                        "terms": {"t": _hex_terms(fields[i])},
                    }
                    for i in range(start, min(start + WRITE_BATCH, len(keys)))
                ],
                timeout=self._timeout,
            )

    def copy_rows(
        self, rows: list[tuple[int, Item]], image_codes: np.ndarray, text_codes: np.ndarray
    ) -> None:
        """Upsert copies of another collection's rows (seq, item), with their seqs and added
        times, and these codes: what a version's sync writes (service/sync_milvus.py). Their
        images are the same files (one artifacts folder for every version)."""
        items = [item for _, item in rows]
        self._upsert(
            [key_of(item.id) for item in items], [seq for seq, _ in rows], image_codes,
            text_codes, [i.text for i in items], [i.image for i in items],
            [i.added for i in items], [i.fields for i in items],
        )  # fmt: skip
        self._commit = max(self._commit, max((seq for seq, _ in rows), default=0))

    def keys_and_seqs(
        self, *, after: str | None = None, upto: str | None = None
    ) -> Iterator[list[tuple[str, int]]]:
        """(primary key, seq) of the stored rows with after < key <= upto, in key order, a page
        at a time (Milvus's query iterator pages by primary key)."""
        bounds = ([f'id > "{after}"'] if after is not None else []) + (
            [f'id <= "{upto}"'] if upto is not None else []
        )  # keys are [0-9a-fs] only (key_of): nothing to escape
        it = self._call(
            self._client.query_iterator,
            self.collection,
            batch_size=SCAN_BATCH,
            filter=" and ".join(bounds),
            output_fields=["seq"],
            timeout=self._timeout,
        )
        try:
            while batch := self._call(it.next):
                yield sorted((str(row["id"]), int(row["seq"])) for row in batch)
        finally:
            it.close()

    def sample_items(self, *, max_items: int, seed: int) -> StoredItems:
        """What `cmh train --from-store` reads: the live items in seq order, a seeded sample of
        max_items when there are more (store/snapshot.py's sample, drawn over seqs)."""
        key_of_seq = {seq: key for page in self.keys_and_seqs() for key, seq in page}
        if not key_of_seq:
            raise InputError(f"expected items in Milvus collection {self.collection!r}, got none")
        seqs = sample_seqs(np.fromiter(key_of_seq, np.int64), max_items=max_items, seed=seed)
        keys = [key_of_seq[int(s)] for s in seqs]
        rows: dict[str, tuple[int, Item]] = {}
        for start in range(0, len(keys), ID_BATCH):
            rows.update(self.rows_by_key(keys[start : start + ID_BATCH]))
        items = [rows[k][1] for k in keys if k in rows]  # one deleted meanwhile: left out
        return StoredItems(items, len(key_of_seq), self.manifest)

    def rows_by_key(self, keys: Sequence[str]) -> dict[str, tuple[int, Item]]:
        """key -> (seq, item) of the stored rows among these keys."""
        found = self._rows([id_of(k) for k in keys], ITEM_FIELDS)
        return {str(row["id"]): (int(row["seq"]), _item(row)) for row in found}

    def delete_keys(self, keys: Sequence[str]) -> None:
        """Delete rows by primary key (a sync: no guard, images left to the served version)."""
        for start in range(0, len(keys), ID_BATCH):
            self._call(
                self._client.delete,
                self.collection,
                ids=list(keys[start : start + ID_BATCH]),
                timeout=self._timeout,
            )

    def delete(self, ids: Sequence[ItemId]) -> Deleted:
        """Delete these ids (acknowledged by Milvus when this returns); the ids that were there
        and the seq that stands for this delete's commit."""
        gone = self._rows(ids, ["image"])
        keys = [row["id"] for row in gone]
        if keys:
            self._guarded(lambda: self.delete_keys(keys))
        commit = self._commit
        if keys:
            commit = self._commit = self._seqs(1)[0]
        self._collect_images([row["image"] for row in gone])
        return Deleted([id_of(k) for k in keys], commit)

    def _collect_images(self, images: list[str]) -> None:
        """Remove store-owned image files no row refers to and no write may be about to."""
        for image in set(images):
            path = self.artifacts / image
            if not _STORED_IMAGE.fullmatch(image) or not path.is_file():
                continue
            if time.time() - path.stat().st_mtime < IMAGE_GRACE_S:
                continue
            holders = [self.collection, *self._other_versions()]
            used = any(
                self._call(
                    self._client.query,
                    holder,
                    filter=f'image == "{image}"',  # [0-9a-z./] only: _STORED_IMAGE
                    output_fields=["id"],
                    limit=1,
                    timeout=self._timeout,
                )
                for holder in holders
            )
            if not used:
                path.unlink(missing_ok=True)

    def _other_versions(self) -> list[str]:
        """The collections of this store's other versions (they share its image files)."""
        names = self._call(self._client.list_collections, timeout=self._timeout)
        versioned = re.compile(rf"{re.escape(self.family)}(_v[0-9]+)?")
        return [n for n in names if n != self.collection and versioned.fullmatch(n)]

    def close(self) -> None:
        """Close the connection (the collection stays on the server)."""
        self._client.close()

    def drop(self) -> None:
        """Delete the collection and everything in it (tests, `migrate --replace`)."""
        self._call(self._client.drop_collection, self.collection, timeout=self._timeout)


def milvus_call(uri: str, timeout_s: float, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) with Milvus failures as NotReadyError (503: unreachable, too slow,
    not ready) or BackendError (500: Milvus answered that it refuses the request, which no
    retry changes)."""
    try:
        return fn(*args, **kwargs)
    except MILVUS_FAILURES as err:
        if is_refusal(err):
            raise BackendError(f"Milvus at {uri} refused the request: {_short(err)}") from None
        raise NotReadyError(
            f"expected Milvus at {uri} to answer within {timeout_s:g} s, got: "
            f"{_short(err)}; retry when it is back"
        ) from None


def _item(row: dict[str, Any]) -> Item:
    return Item(
        id_of(str(row["id"])),
        str(row["text"]),
        str(row["image"]),
        float(row["added"]),
        dict(row["fields"] or {}),
    )


def _short(err: BaseException) -> str:
    """The first line of a pymilvus error, at most 200 characters (a gRPC error: its status
    and details, e.g. "DEADLINE_EXCEEDED: Deadline Exceeded")."""
    if isinstance(err, grpc.Call):
        return f"{err.code().name}: {err.details()}"[:200]
    text = str(getattr(err, "message", "") or err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
