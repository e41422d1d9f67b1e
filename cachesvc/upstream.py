"""Where misses go: the ``Upstream`` protocol and its two real implementations.

* :class:`EngineUpstream` calls the in-process reference engine (``cachesvc.engine_api``);
* :class:`HttpUpstream` calls any OpenAI-compatible server over HTTP with httpx.

Both raise :class:`~cachesvc.errors.UpstreamError` carrying the upstream's status and body, so
the proxy passes errors through unchanged (and never caches them). A stream that stops before
its end raises :class:`IncompleteStreamError`, so a cut stream is never stored.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Protocol, cast

import httpx
import orjson

from cachesvc.errors import UpstreamError

if TYPE_CHECKING:
    from cachesvc.engine_api import Kind
    from gpu_prefix.engine import Engine


class IncompleteStreamError(UpstreamError):
    """Raised when an upstream stream ends without ``[DONE]`` or breaks mid-way."""

    def __init__(self, why: str) -> None:
        super().__init__(502, {"error": {"message": f"upstream stream incomplete: {why}",
                                         "type": "upstream_error", "code": "incomplete_stream"}})


class Upstream(Protocol):
    """An OpenAI-compatible model behind the cache. ``kind`` is "chat" or "completion"."""

    async def complete(self, body: dict[str, Any], kind: str, *, tenant: str) -> dict[str, Any]: ...

    def stream(self, body: dict[str, Any], kind: str, *, tenant: str
               ) -> AsyncGenerator[dict[str, Any], None]: ...

    async def aclose(self) -> None: ...


_PATHS = {"chat": "/chat/completions", "completion": "/completions"}


class HttpUpstream:
    """An OpenAI-compatible HTTP server. ``base_url`` ends where ``/chat/completions`` goes,
    e.g. ``http://127.0.0.1:8000/v1``."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
        )

    async def complete(self, body: dict[str, Any], kind: str, *, tenant: str) -> dict[str, Any]:
        payload = {**body, "stream": False}
        payload.pop("stream_options", None)
        try:
            resp = await self._client.post(_PATHS[kind], content=orjson.dumps(payload),
                                           headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from None
        data = _json(resp)
        if resp.status_code >= 400:
            raise UpstreamError(resp.status_code, data)
        if not isinstance(data, dict):
            raise UpstreamError(502, _err("upstream answered with a non-object body"))
        return data

    async def stream(self, body: dict[str, Any], kind: str, *, tenant: str
                     ) -> AsyncGenerator[dict[str, Any], None]:
        payload = {**body, "stream": True}
        try:
            async with self._client.stream(
                "POST", _PATHS[kind], content=orjson.dumps(payload),
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    raise UpstreamError(resp.status_code, _json(resp))
                done = False
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        chunk = orjson.loads(data)
                    except orjson.JSONDecodeError:
                        raise IncompleteStreamError("a chunk is not JSON") from None
                    if isinstance(chunk, dict) and "error" in chunk and "choices" not in chunk:
                        raise UpstreamError(502, chunk)
                    yield chunk
                if not done:
                    raise IncompleteStreamError("the stream ended without [DONE]")
        except httpx.HTTPError as exc:
            raise IncompleteStreamError(type(exc).__name__) from None

    async def aclose(self) -> None:
        await self._client.aclose()


class EngineUpstream:
    """The in-process reference engine, called through ``cachesvc.engine_api``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def complete(self, body: dict[str, Any], kind: str, *, tenant: str) -> dict[str, Any]:
        from cachesvc import engine_api

        try:
            # parse_request refuses a kind other than chat or completion
            return await engine_api.complete(self.engine, body, cast("Kind", kind), tenant=tenant)
        except engine_api.EngineRequestError as exc:
            raise _engine_error(exc) from None

    async def stream(self, body: dict[str, Any], kind: str, *, tenant: str
                     ) -> AsyncGenerator[dict[str, Any], None]:
        from cachesvc import engine_api

        try:
            async for chunk in engine_api.stream(self.engine, body, cast("Kind", kind),
                                                 tenant=tenant):
                yield chunk
        except engine_api.EngineRequestError as exc:
            raise _engine_error(exc) from None

    async def aclose(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()


def _engine_error(exc: Any) -> UpstreamError:
    status = int(getattr(exc, "status", 400) or 400)
    field = getattr(exc, "field", None)
    retry = getattr(exc, "retry_after_s", None)
    headers = {"Retry-After": str(max(1, int(retry)))} if retry else None
    return UpstreamError(status, {"error": {"message": str(exc), "type": "invalid_request_error",
                                            "param": field, "code": None}}, headers=headers)


def _err(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "upstream_error", "code": None}}


def _unreachable(exc: Exception) -> UpstreamError:
    status = 504 if isinstance(exc, httpx.TimeoutException) else 502
    return UpstreamError(status, _err(f"upstream unreachable: {type(exc).__name__}"))


def _json(resp: httpx.Response) -> Any:
    try:
        return orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return _err(f"upstream answered {resp.status_code} with a non-JSON body")
