"""Filtered search: the rows a filter keeps, read from the store's terms table, as scan masks.

What a filter means (service/schemas.py's SearchFilter says the same to API users):
- a clause names a field and one or more values; an item matches it when the field's value is
  one of them or, for a list value, when one of the list's elements is (as Milvus's
  ARRAY_CONTAINS / ARRAY_CONTAINS_ANY): `"tags": ["news", "2024"]` matches equals tags = "news".
- values are strings, numbers and booleans, compared as JSON values: 5 and 5.0 are one number,
  true is not 1 and "5" is not 5. Objects, null and lists inside lists are never matched.
- an ids list keeps the items with those user ids (5 and "5" alike, store/ids.py).
- the clauses and the ids list are ANDed; a filter with neither keeps every item.

How: each of an item's field values is a row (term, seq) of the terms table, written in the
same transaction as the item (store/store.py), so a term's rows in seq order are its posting
list. A search ANDs each part's live mask with the filter's rows in that part:
- a segment's rows of a filter are found once and kept in an LRU (selection_cache_bytes) under
  the segment's name: segments are immutable, and a row's fields and id never change (a replace
  is a delete and a new row). The growing part's are found for each search.
- posting lists are kept in an LRU (posting_cache_bytes) and caught up with the rows committed
  since (seqs only grow, so that is a read of the seqs past a watermark); a deleted row may stay
  in a kept list, because the part's live mask drops it.
- when few rows of a part pass (at most 1 / gather_ratio of it), their codes are gathered into a
  small index and only they are scanned: a masked scan passes over the whole part, however few
  of its rows are live (its first pass bounds distances over every code).
Every hit is checked against the filter with its own checksummed fields and id (Filter.matches),
so a terms table edited by hand cannot make a search serve an item that the filter excludes.

Over 400 lines because what a filter means (terms, Filter) and how a view answers it
(FilterIndex) share the term format, which must not drift between the two halves.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring  # C speed (ensure_ascii=False's string encoder)
from typing import Any

import numpy as np

from common.errors import InputError
from indexes.asymmetric import Asymmetric
from indexes.hamming import HammingIndex, LiveMask, search_parts
from indexes.results import padded
from store import metadata as md
from store.config import StoreConfig
from store.ids import ItemId, parse_id
from store.view import Part, Target, View

Scalar = bool | int | float | str
MAX_CLAUSES = 16  # field conditions per filter
MAX_VALUES = 1_000  # values in one field's list
MAX_IDS = 10_000  # ids in a filter's ids list
MAX_FIELD_CHARS = 256  # of a field name
MAX_VALUE_CHARS = 1_000  # of a string value in a filter
# An item's filter terms as the Milvus backend stores them ({"t": [hex of each term]}, a JSON
# field that Milvus caps at 65,536 bytes): one limit for both backends, refused at build time.
MAX_TERMS_BYTES = 65_536
GROWING = "growing"  # the name of the growing part (store/store.py): never cached
_INT_FLOAT_LIMIT = 2.0**63  # integral floats below this are written as integers (5.0 -> 5);
# integers from it on, as the float they equal exactly (if one does): one form per number
_FLOAT_MAX_INT = 2**1024  # no float reaches this (float() of a larger integer overflows)
_ENTRY_BYTES = 200  # what a cache entry costs besides its arrays (key, tuple, dict slot)


def _check_unicode(text: str, where: str) -> None:
    """InputError for a lone surrogate (JSON may carry one; SQLite cannot store it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            f"expected {where} of valid Unicode, got a lone surrogate at {err.start}"
        ) from None


def _canonical(value: object, where: str) -> Scalar:
    """The value a term holds: 5.0 becomes 5 (one JSON number), other types are refused."""
    if isinstance(value, str):
        if len(value) > MAX_VALUE_CHARS:
            raise InputError(
                f"expected {where} of at most {MAX_VALUE_CHARS} characters, got {len(value)}"
            )
        _check_unicode(value, where)
        return value
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _int_canonical(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"expected {where} as a finite number, got {value}")
        return int(value) if value.is_integer() and abs(value) < _INT_FLOAT_LIMIT else value
    raise InputError(f"expected {where} as a string, number or boolean, got {type(value).__name__}")


def _int_canonical(value: int) -> int | float:
    """An integer's one form: itself below 2**63, the float it equals exactly at or past it (so
    that 1e20 and 100000000000000000000 are one number, as Python's == and JSON's values say),
    itself where no float equals it."""
    if abs(value) < _INT_FLOAT_LIMIT or abs(value) >= _FLOAT_MAX_INT:
        return value
    as_float = float(value)
    return as_float if as_float == value else value


def _json(value: Scalar) -> str:
    """json.dumps(value, ensure_ascii=False) of a finite scalar, at C speed for strings (a
    bulk ingest makes one term per field value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return encode_basestring(value)
    return int.__repr__(value) if isinstance(value, int) else float.__repr__(value)


def term(field: str, value: Scalar) -> str:
    """The terms-table key of one field value: JSON [field, value] (types kept: 1 is not true)."""
    return f"[{encode_basestring(field)},{_json(value)}]"


def _item_term(field: str, value: object, *, raw_ints: bool = False) -> str | None:
    if isinstance(value, bool | str) or (raw_ints and isinstance(value, int)):
        return term(field, value)
    if isinstance(value, int):
        return term(field, _int_canonical(value))
    if isinstance(value, float) and math.isfinite(value):
        return term(field, _canonical(value, "a value"))
    return None  # an object or null: never matched


def _key(value: object) -> tuple[str, object] | None:
    """What a value is compared by (matches' equivalent of its term): its JSON type and its
    canonical value; None for a value no filter matches."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, int):
        return ("n", _int_canonical(value))
    if isinstance(value, float) and math.isfinite(value):
        return ("n", _canonical(value, "a value"))
    return None


def terms_of(fields: Mapping[str, Any], *, raw_ints: bool = False) -> list[str]:
    """The distinct terms of an item's fields: one per scalar value, one per scalar element of
    a list value. `raw_ints`: integers as schema version 2 wrote them (the upgrade's use)."""
    found: dict[str, None] = {}
    for field, value in fields.items():
        head = f"[{encode_basestring(field)},"
        # a tuple too: the stored JSON (and so every later read of the row) makes it a list
        for element in value if isinstance(value, list | tuple) else (value,):
            if type(element) is str:  # the common case, inline: one call per field value
                found[f"{head}{encode_basestring(element)}]"] = None
            elif (key := _item_term(field, element, raw_ints=raw_ints)) is not None:
                found[key] = None
    return list(found)


def retermed_v3(fields_json: str) -> tuple[list[str], list[str]]:
    """(terms schema version 2 stored and 3 does not, terms 3 stores and 2 did not) of a row's
    fields: version 3 writes an integer from 2**63 on as the float it equals (_int_canonical)."""
    try:
        fields = json.loads(fields_json)
    except ValueError:
        return [], []
    if not isinstance(fields, dict):
        return [], []
    before, after = set(terms_of(fields, raw_ints=True)), set(terms_of(fields))
    return sorted(before - after), sorted(after - before)


def checked_terms(fields: Mapping[str, Any]) -> list[str]:
    """terms_of(fields), or InputError when they pass MAX_TERMS_BYTES as stored (one limit for
    both backends, checked before anything is written)."""
    terms = terms_of(fields)
    size = stored_terms_bytes(terms)
    if size > MAX_TERMS_BYTES:
        raise InputError(
            f"expected the item's fields to make at most {MAX_TERMS_BYTES} bytes of filter terms "
            "(a term is a field name with one of its values, hex-encoded; a list makes one per "
            f"element), got {size}"
        )
    return terms


def stored_terms_bytes(terms: Sequence[str]) -> int:
    """The size of terms as the Milvus backend stores them, {"t": ["<hex>", ...]}, in bytes."""
    return len('{"t": []}') + sum(2 * len(t.encode("utf-8", "surrogatepass")) + 4 for t in terms)


def terms_of_json(fields_json: str) -> list[str]:
    """terms_of of a stored fields JSON; none for text that is not a JSON object (such a row
    fails its checksum when it is read)."""
    try:
        fields = json.loads(fields_json)
    except ValueError:
        return []
    return terms_of(fields) if isinstance(fields, dict) else []


@dataclass(frozen=True)
class Clause:
    """A field and the values it may hold (one for equality); terms are their table keys."""

    field: str
    values: tuple[Scalar, ...]  # canonical, distinct as JSON values
    terms: tuple[str, ...]  # term(field, value) of each
    keys: frozenset[tuple[str, object]]  # _key(value) of each

    def holds(self, fields: Mapping[str, Any]) -> bool:
        """Whether the fields pass: the value is one of ours, or a list holding one."""
        if self.field not in fields:
            return False
        value = fields[self.field]
        return any(_key(v) in self.keys for v in (value if isinstance(value, list) else (value,)))


@dataclass(frozen=True)
class Filter:
    """Which items a search may return: every clause holds and the id is listed (if ids)."""

    clauses: tuple[Clause, ...]
    ids: frozenset[ItemId] | None  # canonical ids; None: any id
    key: str  # identifies the filter (order of clauses and ids aside): its cache key

    @classmethod
    def of(
        cls,
        *,
        equals: Mapping[str, object] | None = None,
        any_of: Mapping[str, Sequence[object]] | None = None,
        ids: Sequence[object] | None = None,
    ) -> Filter:
        """A checked filter: field = value, field in values, and an ids list, ANDed."""
        wanted: list[tuple[str, Sequence[object]]] = []
        for field, value in (equals or {}).items():
            wanted.append((field, [value]))
        for field, values in (any_of or {}).items():
            if isinstance(values, str | bytes) or not isinstance(values, Sequence):
                raise InputError(f"expected a list of values for {field!r}, got {values!r:.40}")
            if not 1 <= len(values) <= MAX_VALUES:
                raise InputError(
                    f"expected 1..{MAX_VALUES} values for {field!r}, got {len(values)}"
                )
            wanted.append((field, values))
        if len(wanted) > MAX_CLAUSES:
            raise InputError(f"expected at most {MAX_CLAUSES} field conditions, got {len(wanted)}")
        clauses = []
        for field, values in wanted:
            if not isinstance(field, str) or not 1 <= len(field) <= MAX_FIELD_CHARS:
                raise InputError(f"expected a field name of 1..{MAX_FIELD_CHARS} characters")
            _check_unicode(field, "a field name")
            by_term = {}
            for value in values:
                canonical = _canonical(value, f"the value of {field!r}")
                by_term[term(field, canonical)] = canonical
            canonical_values = tuple(by_term.values())
            keys = frozenset(kv for v in canonical_values if (kv := _key(v)) is not None)
            clauses.append(Clause(field, canonical_values, tuple(by_term), keys))
        id_set = None
        if ids is not None:
            if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
                raise InputError(f"expected a list of ids, got {type(ids).__name__}")
            if len(ids) > MAX_IDS:
                raise InputError(f"expected at most {MAX_IDS} ids in a filter, got {len(ids)}")
            id_set = frozenset(parse_id(i) for i in ids)
        key = json.dumps(
            [
                sorted(sorted(c.terms) for c in clauses),
                None if id_set is None else sorted(f"{type(i).__name__}:{i}" for i in id_set),
            ],
            ensure_ascii=False,
        )
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        return cls(tuple(clauses), id_set, digest)

    @property
    def keeps_all(self) -> bool:
        """Whether the filter has no condition (it keeps every item: an unfiltered search)."""
        return not self.clauses and self.ids is None

    def matches(self, item_id: ItemId, fields: Mapping[str, Any]) -> bool:
        """Whether an item with this id and these fields passes (the oracle of every search)."""
        if self.ids is not None and item_id not in self.ids:
            return False
        return all(c.holds(fields) for c in self.clauses)


@dataclass(frozen=True)
class _Selection:
    """A filter's rows in one part, before the live mask: positions when few, else a bitset."""

    n: int  # rows of the part
    positions: np.ndarray | None  # (c,) int64 ascending
    words: np.ndarray | None  # (ceil(n / 64),) uint64, LiveMask's layout

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.positions, self.words) if a is not None)


class _Lru:
    """Values by key up to a byte budget, least recently used dropped first (own lock)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if nbytes > self.budget:  # never kept: it would evict everything else
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.budget:
                _, (_, size) = self._items.popitem(last=False)
                self._bytes -= size


class FilterIndex:
    """Answers filtered searches of one store's views (thread-safe; caches behind locks)."""

    def __init__(self, config: StoreConfig) -> None:
        self._gather_ratio = config.gather_ratio
        self._postings = _Lru(config.posting_cache_bytes)  # term -> (seqs, complete below a seq)
        self._selections = _Lru(config.selection_cache_bytes)  # (segment, filter) -> _Selection

    def search(
        self,
        view: View,
        target: Target,
        queries: np.ndarray,
        k: int,
        where: Filter,
        conn: sqlite3.Connection,
        *,
        asymmetric: Asymmetric | None = None,
        radius: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(dists (m, k), seqs (m, k)) of the exact top-k among the view's live rows that pass
        `where`: the order, ties and padding of View.search (and its scorings and radius)."""
        searched = self.parts(view, target, where, conn)
        if not searched:
            return padded(queries.shape[0], k)
        return search_parts(searched, queries, k, asymmetric=asymmetric, radius=radius)

    def parts(
        self, view: View, target: Target, where: Filter, conn: sqlite3.Connection
    ) -> list[tuple[HammingIndex, LiveMask | None]]:
        """What to scan: per part with passing live rows, its index and mask, or a gathered
        index of just those rows."""
        upto = int(view.parts[-1].seqs[-1]) + 1 if view.parts else 0
        id_seqs: np.ndarray | None = None  # read once per search, and only if a part needs it
        out = []
        for part in view.parts:
            if not part.n_live:
                continue
            key = (part.name, where.key)
            chosen = None if part.name == GROWING else self._selections.get(key)
            if chosen is None:
                if where.ids is not None and id_seqs is None:
                    id_seqs = md.seqs_of_ids(conn, list(where.ids))
                chosen = self._select(part, where, conn, upto, id_seqs)
                if part.name != GROWING:
                    self._selections.put(key, chosen, chosen.nbytes + _ENTRY_BYTES)
            scanned = _scanned(part, target, chosen)
            if scanned is not None:
                out.append(scanned)
        return out

    def _posting(self, conn: sqlite3.Connection, key: str, upto: int) -> np.ndarray:
        """(r,) int64 ascending seqs holding the term, complete below `upto` (maybe more)."""
        kept = self._postings.get(key)
        if kept is not None and kept[1] >= upto:
            return kept[0]  # type: ignore[no-any-return]  # the LRU holds (ndarray, int)
        start = 0 if kept is None else kept[1]
        fresh = md.term_seqs(conn, key, start, upto)
        seqs = fresh if kept is None else np.concatenate([kept[0], fresh])
        self._postings.put(key, (seqs, upto), seqs.nbytes + _ENTRY_BYTES)
        return seqs

    def _select(
        self,
        part: Part,
        where: Filter,
        conn: sqlite3.Connection,
        upto: int,
        id_seqs: np.ndarray | None,
    ) -> _Selection:
        seqs = part.seqs
        lo, hi = int(seqs[0]), int(seqs[-1]) + 1
        lists = []
        for clause in where.clauses:
            pieces = [_within(self._posting(conn, t, upto), lo, hi) for t in clause.terms]
            lists.append(pieces[0] if len(pieces) == 1 else np.unique(np.concatenate(pieces)))
        if id_seqs is not None:
            lists.append(_within(id_seqs, lo, hi))
        if not lists:
            raise InputError("expected a filter with a condition (keeps_all is unfiltered)")
        lists.sort(key=len)
        kept = lists[0]
        for other in lists[1:]:
            kept = kept[_members(other, kept)]
        positions = _positions(seqs, kept)
        n = int(seqs.shape[0])
        if positions.size * self._gather_ratio <= n:
            return _Selection(n, positions, None)
        chosen = np.zeros(n, bool)
        chosen[positions] = True
        return _Selection(n, None, LiveMask.of(chosen).words)


def _within(seqs: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The slice of ascending seqs in [lo, hi)."""
    a, b = np.searchsorted(seqs, [lo, hi])
    return seqs[a:b]


def _members(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """(len(needles),) bool: which needles the ascending haystack holds."""
    if not haystack.size:
        return np.zeros(needles.shape[0], bool)
    pos = np.minimum(np.searchsorted(haystack, needles), haystack.size - 1)
    return haystack[pos] == needles  # type: ignore[no-any-return]  # numpy's bool array


def _positions(seqs: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """(c,) int64 ascending positions in the ascending seqs of those wanted seqs it holds."""
    n = int(seqs.shape[0])
    if n and int(seqs[-1]) - int(seqs[0]) + 1 == n:  # no gaps (most segments): a subtraction
        return wanted - seqs[0]  # type: ignore[no-any-return]  # int64 array
    pos = np.searchsorted(seqs, wanted)
    return pos[_members(seqs, wanted)]  # type: ignore[no-any-return]


def _live_bits(live: LiveMask, positions: np.ndarray) -> np.ndarray:
    """(c,) bool: which positions the mask has live."""
    shifts = (positions & 63).astype(np.uint64)
    return ((live.words[positions >> 6] >> shifts) & np.uint64(1)).astype(bool)  # type: ignore[no-any-return]


def _scanned(
    part: Part, target: Target, chosen: _Selection
) -> tuple[HammingIndex, LiveMask | None] | None:
    """The part's index and the mask of its live rows that pass, or an index of only those
    rows (few); None when none passes."""
    index = part.index_for(target)
    if chosen.positions is not None:
        pos = chosen.positions
        if part.live is not None and pos.size:
            pos = pos[_live_bits(part.live, pos)]
        if not pos.size:
            return None
        codes = np.asarray(index.codes)[pos]
        return HammingIndex.from_arrays(
            index.n_bits, codes, np.asarray(part.seqs)[pos], threads=index.threads
        ), None
    assert chosen.words is not None
    words = chosen.words if part.live is None else chosen.words & part.live.words
    count = int(np.bitwise_count(words).sum())
    if not count:
        return None
    return index, LiveMask(words, chosen.n, count)
