"""Error bodies that can always be sent: the service's one shape, and FastAPI's 422 shape bounded.

Python strings can hold what UTF-8 cannot (a lone surrogate from a JSON "\\ud800", a file name
read with surrogateescape), and Python's JSON parser reads NaN and Infinity, which JSON responses
refuse: echoing either back would turn a 4xx into a 500. `printable` writes lone surrogates as
visible escapes ("\\ud800"); a validation error echoes at most ECHO_CHARS characters of input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from service.schemas import ErrorItem

ECHO_CHARS = 200  # of a client's input echoed in a 422 (FastAPI echoes all of it)
MESSAGE_CHARS = 1000  # of a validation message (ours quote at most a short excerpt)


def printable(text: str) -> str:
    """`text` with lone surrogates written as backslash escapes, so that it encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


# What python-multipart's parse errors mean for a client (Starlette says only "Invalid multipart
# data."); its default limits, which Starlette does not change.
MULTIPART_HEADER_BYTES = 4096 + 128  # python_multipart.multipart.DEFAULT_MAX_HEADER_SIZE
_MULTIPART_REASONS = {
    "Maximum header size exceeded": (
        f"expected each part's header lines (the file name is in one) to take at most "
        f"{MULTIPART_HEADER_BYTES} bytes, got a longer one"
    ),
    "Maximum header count exceeded": "expected at most 8 header lines per part, got more",
}


def http_detail(err: Exception, detail: str) -> str:
    """An HTTPException's detail, with the reason of a multipart parse error spelled out."""
    context = err.__context__
    cause = context.__cause__ if context is not None else None
    if detail != "Invalid multipart data." or cause is None:
        return detail
    reason = str(cause.args[0]) if cause.args else type(cause).__name__
    return f"invalid multipart data: {_MULTIPART_REASONS.get(reason, reason)}"


def error_response(
    status: int,
    detail: str,
    errors: Sequence[ErrorItem] = (),
    *,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The service's error body, {"detail": str, "errors": [ErrorItem...]}, always encodable."""
    items = [
        e.model_copy(
            update={
                "reason": printable(e.reason),
                "id": printable(e.id) if isinstance(e.id, str) else e.id,
            }
        ).model_dump(mode="json")
        for e in errors
    ]
    return JSONResponse(
        {"detail": printable(detail), "errors": items}, status_code=status, headers=headers
    )


def validation_body(errors: Sequence[Any]) -> dict[str, list[dict[str, Any]]]:
    """FastAPI's 422 body, {"detail": [{"type", "loc", "msg", "input", "ctx"}]}, with the input
    each error echoes cut to ECHO_CHARS characters and every string encodable."""
    return {"detail": [_bounded_error(e) for e in errors]}


def _bounded_error(error: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in error.items():
        if key == "loc":
            out[key] = [_echo(part) for part in value]
        elif key == "msg":
            out[key] = _cut(str(value), MESSAGE_CHARS)
        elif key == "ctx" and isinstance(value, Mapping):
            out[key] = {str(k): _echo(v) for k, v in jsonable_encoder(dict(value)).items()}
        else:
            out[key] = _echo(value)
    return out


def _cut(text: str, limit: int = ECHO_CHARS) -> str:
    return printable(text if len(text) <= limit else f"{text[:limit]}…")


def _echo(value: object) -> object:
    """A JSON value that shows `value` in at most about ECHO_CHARS characters."""
    if isinstance(value, str):
        return _cut(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN and Infinity, which json.loads reads and JSON cannot hold
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return _cut(type(value).__name__)
    if len(text) > ECHO_CHARS:
        return _cut(text)
    return _small(value)


def _small(value: object) -> object:
    """A short JSON value with its strings printable and non-finite floats as strings."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {printable(str(k)): _small(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_small(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return printable(str(value))
