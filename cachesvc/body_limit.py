"""Every request body has a size limit, enforced before the body is read.

An ASGI middleware, so it covers every route alike (routes that parse with pydantic included)
and runs before any of them reads a byte:

* a declared ``Content-Length`` over the route's limit is answered 413 at once (the server
  delivers no more body than a declared length, so a body within it needs no counting);
* a body without one (chunked) is counted as it arrives and refused when it passes the limit.

NOTE: a client that sends its whole body before reading the answer (plain ``urllib``, many
SDKs) would see a connection reset, not the 413, if the server answered and closed with body
bytes unread. So the rest of an oversize body is read and dropped first, for at most
``drain_s`` seconds and ``drain_bytes`` bytes; a client that announced ``Expect: 100-continue``
has not sent its body and is answered at once. Past either bound the connection is closed.
How long a body may take to arrive at all is the server protocol's bound
(:mod:`cachesvc.http_protocol`).

NOTE: Starlette's own ``max_body_size`` (RequestBodyLimitMiddleware) is not used: it answers
without reading the rest (the reset above) and takes one limit per app or route, where this
service's limits follow its settings. Its signalling is reused: the refusal is an
``HTTPException``, which FastAPI's body parsing re-raises instead of turning into a 400.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from starlette.exceptions import HTTPException

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyRefused(HTTPException):
    """Raised (inside the app) when a request body is over its limit; answered by
    :func:`refusal` through the app's handler, or by the middleware itself."""

    def __init__(self, status: int, message: str, fix: str) -> None:
        # The body may be left unread: the connection carries no further request.
        super().__init__(status, message, headers={"connection": "close"})
        self.message, self.fix = message, fix


class BodyLimit:
    """Refuse request bodies over ``limit_for(path)`` (bytes, and the setting that sets them)."""

    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str], tuple[int, str]],
                 drain_s: float = 30.0, drain_bytes: int = 1 << 30) -> None:
        self.app = app
        self.limit_for = limit_for
        self.drain_s = drain_s
        self.drain_bytes = drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope["path"])
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is None:
            await self.app(scope, self._counting(receive, limit, setting), send)
        elif declared.isdigit() and int(declared) <= limit:
            await self.app(scope, receive, send)  # the hot path: nothing more to do
        else:
            # Refused before the app runs (and before a byte of the body is kept).
            if not declared.isdigit():
                refused = BodyRefused(400, "Content-Length is not a number",
                                      "send the body's length in bytes")
            else:
                if headers.get(b"expect", b"").lower() != b"100-continue":
                    await self._drain(receive, int(declared))
                refused = _too_large(limit, setting)
            status, out, body = refusal(refused)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(k.encode(), v.encode()) for k, v in out.items()]})
            await send({"type": "http.response.body", "body": body})

    def _counting(self, receive: Receive, limit: int, setting: str) -> Receive:
        seen = 0

        async def counted() -> Message:
            # Raises BodyRefused inside the app, which answers it (cachesvc.api.errors).
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    if message.get("more_body", False):
                        await self._drain(receive, self.drain_bytes)
                    raise _too_large(limit, setting)
            return message

        return counted

    async def _drain(self, receive: Receive, budget: int) -> None:
        """Read and drop the rest of the body, for at most ``drain_s`` and ``budget`` bytes."""
        dropped = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.drain_s):
                while dropped <= min(budget, self.drain_bytes):
                    message = await receive()
                    if message["type"] != "http.request":
                        return
                    dropped += len(message.get("body", b""))
                    if not message.get("more_body", False):
                        return


def _too_large(limit: int, setting: str) -> BodyRefused:
    return BodyRefused(413, f"the request body exceeds {setting} = {limit} bytes",
                       f"send a smaller body, or raise {setting.split(' ')[0]}")


def refusal(refused: BodyRefused) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and JSON body (the service's error shape) answering ``refused``."""
    body = orjson.dumps({"error": {
        "message": f"body: {refused.message}", "type": "invalid_request_error",
        "param": "body", "code": "too_large" if refused.status_code == 413 else "invalid_body",
        "fix": refused.fix}})
    return refused.status_code, {"content-type": "application/json",
                                 "content-length": str(len(body)), **(refused.headers or {})}, body
