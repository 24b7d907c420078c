"""Pure ASGI middleware: request metrics, and the body limit applied while a body streams.

Pure ASGI rather than `@app.middleware("http")`: the limit has to wrap `receive` itself, so that a
body without a Content-Length (Transfer-Encoding: chunked) is refused once it passes the limit,
not after it has been read whole.
"""

from __future__ import annotations

import logging
import time

from anyio import to_thread
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import NotReadyError
from service.errors import error_response
from service.metrics import Metrics

# Methods that get their own metrics label; any other name a client invents is "other".
logger = logging.getLogger(__name__)

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})
UNMATCHED = "unmatched"  # the route label of a request no route matched


class BodyTooLarge(HTTPException):
    """A request body past the limit: 413, and the connection is closed rather than drained."""

    def __init__(self, max_bytes: int, got: str) -> None:
        super().__init__(
            413,
            f"expected a body of at most {max_bytes} bytes, got {got}",
            headers={"Connection": "close"},
        )


class BodyLimit:
    """Refuses a body past `max_bytes` with 413: at once when its Content-Length says so, else as
    soon as the bytes received pass the limit (the rest is never read)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            got = length if len(length) <= 40 else f"{length[:40]}..."
            await self._refuse(scope, receive, send, BodyTooLarge(self.max_bytes, got))
            return
        received = 0
        started = False

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException, so that FastAPI's body parsing lets it through to the
                    # app's handler (any other exception there becomes a 400).
                    raise BodyTooLarge(self.max_bytes, "more (chunked)")
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except BodyTooLarge as err:  # read outside the routes' handlers: answer here
            if started:
                raise
            await self._refuse(scope, receive, send, err)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, err: BodyTooLarge) -> None:
        response = error_response(err.status_code, str(err.detail), headers=err.headers)
        await response(scope, receive, send)


class RequestMetrics:
    """Counts requests by method, route and status, and times them by route.

    Labels come from bounded sets only: a method outside KNOWN_METHODS is "other", a request no
    route matched is "unmatched", so a client cannot grow /metrics by inventing names.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def tracked(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        finally:
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            route = getattr(scope.get("route"), "path", UNMATCHED)
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


LOADED_KEY = "cmh.loaded"  # the scope entry holding the request's version (service.api.deps)


class ServedVersion:
    """Gives each request a lease on the served version (service/serving.py) for its whole
    life: routes read it from the scope (service.api.deps.get_loaded). When another worker has
    switched versions (CURRENT changed), the new one is loaded first, off the event loop."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        serving = getattr(scope["app"].state, "serving", None) if "app" in scope else None
        if scope["type"] != "http" or serving is None:
            await self.app(scope, receive, send)
            return
        if serving.stale():
            try:
                await to_thread.run_sync(serving.follow)
            except NotReadyError:
                # Milvus (where the pointer is) does not answer: the route answers with what is
                # loaded, a liveness probe 200, anything that needs Milvus its own 503.
                logger.warning("could not read the served version; answering with %s",
                               serving.current().version)  # fmt: skip
        loaded = serving.enter()
        scope[LOADED_KEY] = loaded
        try:
            await self.app(scope, receive, send)
        finally:
            serving.leave(loaded)
