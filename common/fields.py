"""The user's fields of an item: what any of them may hold, checked in one place.

Every way in (an HTTP build item, a `pairs.jsonl` line's extra keys, the store's own batch check)
calls `fields_json`, so one set of limits and messages holds for all, and nothing stored can make
a later read or response fail:
- a JSON object with string keys, no NaN or Infinity, valid Unicode;
- at most MAX_FIELDS_BYTES as UTF-8 JSON;
- nested at most MAX_FIELDS_DEPTH levels (the object itself is level 1, each object or list
  inside it one more): deeper values are refused before anything is stored, since pydantic's
  serializer gives up past 255 levels and Python's json module past its recursion limit, so one
  such item would make every search that returns it fail.
`depth` walks a value without recursion, so it answers for any value, however deep.
"""

from __future__ import annotations

import json
from typing import Any

from common.errors import InputError

MAX_FIELDS_BYTES = 16_384  # the user's fields of one item, as UTF-8 JSON
MAX_FIELDS_DEPTH = 32  # nesting levels of the fields object (the object itself is 1)


def depth(value: object, *, stop: int | None = None) -> int:
    """Nesting levels of a JSON-like value: 0 for a scalar, 1 for a flat object or list.

    With `stop`, the walk ends as soon as a level past it is found (returns stop + 1).
    """
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        deepest = max(deepest, level)
        if stop is not None and deepest > stop:
            return stop + 1
        stack.extend((child, level + 1) for child in children)
    return deepest


def fields_json(fields: object) -> str:
    """The fields as stored (compact JSON, sorted keys); InputError saying which limit they pass."""
    if type(fields) is dict and not fields:  # the common case, without json.dumps
        return "{}"
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise InputError(f"expected the item's fields as an object, got {type(fields).__name__}")
    levels = depth(fields, stop=MAX_FIELDS_DEPTH)
    if levels > MAX_FIELDS_DEPTH:
        raise InputError(
            f"expected the item's fields nested at most {MAX_FIELDS_DEPTH} levels deep, got deeper"
        )
    try:
        text = json.dumps(fields, ensure_ascii=False, sort_keys=True, allow_nan=False)
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise InputError(
            "expected the item's fields as JSON of valid Unicode, got a lone surrogate at "
            f"{err.start}"
        ) from None
    except (ValueError, TypeError) as err:  # NaN or Infinity, a set, a value JSON cannot hold
        raise InputError(f"expected the item's fields as JSON, got: {err}") from None
    if size > MAX_FIELDS_BYTES:
        raise InputError(
            f"expected the item's fields to take at most {MAX_FIELDS_BYTES} bytes as JSON, "
            f"got {size}"
        )
    return text
