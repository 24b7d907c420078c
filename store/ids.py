"""Item ids as users give them: non-negative integers or strings (file names, UUIDs).

One id has one form everywhere: a string of decimal digits without a leading zero ("5") is the
integer 5, in a JSON body, a CSV file or a URL path alike, so `DELETE /v1/items/5` finds the item
added as 5 or as "5". Other strings ("007", "IMG_0001.jpg", a UUID) stay strings; "." and ".." are
refused, since no URL can name them.
"""

from __future__ import annotations

import re

from common.errors import InputError

ItemId = int | str
MAX_INT_ID = 2**63 - 1
MAX_ID_CHARS = 256
_CANONICAL_INT = re.compile(r"(0|[1-9][0-9]{0,18})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Path segments every HTTP client (httpx, curl, browsers) normalises away, percent-encoded or not:
# an item with such an id could never be fetched or deleted by its URL.
DOT_SEGMENTS = (".", "..")


def parse_id(value: object) -> ItemId:
    """The canonical id of a user's value; InputError saying what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InputError(f"expected an integer or string id, got {type(value).__name__}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_INT_ID:
            raise InputError(f"expected an integer id in 0..{MAX_INT_ID}, got {value}")
        return value
    if not value or len(value) > MAX_ID_CHARS:
        raise InputError(f"expected a string id of 1..{MAX_ID_CHARS} characters, got {len(value)}")
    if value in DOT_SEGMENTS:
        raise InputError(
            f"expected a string id other than '.' and '..' (URLs cannot address them: clients "
            f"remove such path segments), got {value!r}"
        )
    if _CONTROL.search(value):
        raise InputError(f"expected a string id without control characters, got {value[:40]!r}")
    try:
        value.encode("utf-8")  # what SQLite stores
    except UnicodeEncodeError:
        raise InputError(f"expected a string id of valid Unicode, got {value[:40]!r}") from None
    if _CANONICAL_INT.fullmatch(value) and int(value) <= MAX_INT_ID:
        return int(value)
    return value
