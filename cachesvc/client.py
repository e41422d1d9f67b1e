"""A client for the cache API, for gateways that call the model themselves.

    with CacheClient("http://cache:8080", api_key) as cache:
        found = cache.lookup(request)                  # the OpenAI request body
        if found.hit:
            return found.response                      # (found.chunks for a streamed request)
        answer = call_the_model(request)
        cache.store(found, response=answer)            # a no-op unless the lookup was a miss

``AsyncCacheClient`` is the same with ``await``. Both keep one pool of keep-alive connections
(close the client, or use it as a context manager), bound every call by ``timeout_s``, and fail
open: the service down, slow, or refusing a request makes ``lookup`` a result with status
``"error"`` (treat it as a miss with nothing to store) and ``store`` a no-op, never an exception
into the caller's request path. ``fail_open=False`` raises instead, with the service's own
errors (``cachesvc.errors``: ``BadRequestError`` 400, ``AuthError`` 401, ``StaleEpochError`` 409,
``TooLargeError`` 413, ``UnprocessableError`` 422), or ``CacheUnavailableError`` when it cannot
be reached. After ``breaker_failures`` unreachable calls in a row the client stops calling for
``breaker_reset_s`` and then lets one probe through (``cachesvc.breaker``), so a dead service
costs the gateway nothing per request.

Streams: ``fill_stream(found, chunks)`` passes the model's chunks through and stores them once
the stream has ended normally; a stream cut short (an error, or the caller stopping early) is
never stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from cachesvc.breaker import BreakerState, CircuitBreaker
from cachesvc.errors import (
    AuthError,
    BadRequestError,
    CacheUnavailableError,
    NotFoundError,
    ServiceError,
    StaleEpochError,
    TooLargeError,
    UnprocessableError,
)
from cachesvc.streaming import stream_complete

__all__ = ["AsyncCacheClient", "CacheClient", "Lookup", "Stored"]

log = logging.getLogger("cachesvc.client")

DEFAULT_TIMEOUT_S = 1.0

JSON = dict[str, Any]
#: A request: the OpenAI body, or its JSON already encoded (``orjson.Fragment``), sent as is.
Request = Mapping[str, Any] | orjson.Fragment
Kind = Literal["chat", "completion"]

# The service's 4xx statuses and the error each stands for (cachesvc/api/errors.py).
_ERRORS: dict[int, type[ServiceError]] = {cls.status: cls for cls in (
    BadRequestError, AuthError, NotFoundError, StaleEpochError, TooLargeError,
    UnprocessableError)}


@dataclass(frozen=True, kw_only=True, slots=True)
class Lookup:
    """What the cache said about a request.

    ``hit``: ``response`` is the cached body (and ``chunks`` the cached stream, for a request
    with ``stream: true``). ``miss``: call the model, then ``store`` with this lookup.
    ``bypass``: the service will not cache this request (``reason`` says why). ``error``: the
    cache failed (``error`` holds what happened); call the model and store nothing.
    """

    status: Literal["hit", "miss", "bypass", "error"]
    reason: str
    response: JSON | None = None
    chunks: list[JSON] | None = None
    age: int | None = None
    fill_token: str | None = None
    error: ServiceError | None = None

    @property
    def hit(self) -> bool:
        return self.status == "hit"


@dataclass(frozen=True, kw_only=True, slots=True)
class Stored:
    """Whether a store kept the answer; ``reason`` says why not (``error`` when it failed)."""

    stored: bool
    reason: str | None = None
    error: ServiceError | None = None


_NOTHING_TO_STORE = Stored(stored=False, reason="the lookup gave no fill token")


class _Protocol:
    """What both clients share: the bodies they send, the answers they read, the breaker and
    the fail-open rule. Holds no connection."""

    def __init__(self, api_key: str, *, fail_open: bool, breaker_failures: int,
                 breaker_reset_s: float, clock: Callable[[], float]) -> None:
        self.fail_open = fail_open
        self.auth = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._breaker = CircuitBreaker(failures=breaker_failures, reset_after_s=breaker_reset_s,
                                       clock=clock, on_change=self._changed)
        # NOTE: the breaker is not thread-safe and a sync client may serve many threads.
        self._lock = threading.Lock()

    @staticmethod
    def _changed(state: BreakerState) -> None:
        log.warning("cachesvc_client_breaker_%s", state)

    def allow(self) -> bool:
        with self._lock:
            return self._breaker.allow()

    def reached(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self._breaker.success()
            else:
                self._breaker.failure()

    def headers(self, cache_control: str | None) -> dict[str, str]:
        return self.auth if cache_control is None else {**self.auth, "Cache-Control": cache_control}

    @staticmethod
    def lookup_body(request: Request, kind: Kind | None) -> bytes:
        return _dumps({"request": request} if kind is None else {"request": request, "kind": kind})

    @staticmethod
    def store_body(found: Lookup, response: Mapping[str, Any] | None,
                   chunks: Iterable[Mapping[str, Any]] | None,
                   request: Request | None, ttl_seconds: int | None) -> bytes:
        body: JSON = {"fill_token": found.fill_token}
        if response is not None:
            body["response"] = response
        if chunks is not None:
            body["chunks"] = list(chunks)
        if request is not None:
            body["request"] = request
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        return _dumps(body)

    def read(self, r: httpx.Response) -> JSON:
        """The JSON of a 2xx answer, or raise the service's error for it."""
        self.reached(r.status_code < 500)
        try:
            body = orjson.loads(r.content)
        except orjson.JSONDecodeError:
            body = None
        if r.status_code < 300 and isinstance(body, dict):
            return body
        err = body.get("error") if isinstance(body, dict) else None
        cls = _ERRORS.get(r.status_code)
        if cls is None or not isinstance(err, dict):
            raise CacheUnavailableError(f"the cache service answered {r.status_code}",
                                        fix="check the service's health and log")
        raise cls(str(err.get("message")), field=err.get("param"), fix=err.get("fix"))

    def unreachable(self, exc: Exception) -> CacheUnavailableError:
        self.reached(False)
        out = CacheUnavailableError(f"the cache service is unreachable ({type(exc).__name__})",
                                    fix="check the service's URL and that it is up")
        out.__cause__ = exc
        return out

    def failed_lookup(self, exc: ServiceError) -> Lookup:
        if not self.fail_open:
            raise exc
        return Lookup(status="error", reason=f"{exc.code}: {exc.message}", error=exc)

    def failed_store(self, exc: ServiceError) -> Stored:
        if not self.fail_open:
            raise exc
        return Stored(stored=False, reason=f"{exc.code}: {exc.message}", error=exc)

    @staticmethod
    def lookup_result(body: JSON) -> Lookup:
        if body.get("status") not in ("hit", "miss", "bypass"):
            raise CacheUnavailableError("the answer is not a lookup result",
                                        fix="check that the URL is the cache service's")
        return Lookup(status=body["status"], reason=body.get("reason", ""),
                      response=body.get("response"), chunks=body.get("chunks"),
                      age=body.get("age"), fill_token=body.get("fill_token"))

    @staticmethod
    def store_result(body: JSON) -> Stored:
        return Stored(stored=bool(body.get("stored")), reason=body.get("reason"))


_BREAKER_OPEN = "the cache service failed repeatedly; calls resume after breaker_reset_s"


def _dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError as exc:  # orjson.JSONEncodeError
        raise BadRequestError(f"the request cannot be sent as JSON ({exc})", field="request",
                              fix="pass plain JSON values (dicts, lists, str, numbers)") from None


class CacheClient:
    """The cache API over HTTP, blocking. Thread-safe; one per process is enough."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 fail_open: bool = True, max_connections: int = 100, breaker_failures: int = 3,
                 breaker_reset_s: float = 5.0, transport: httpx.BaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._p = _Protocol(api_key, fail_open=fail_open, breaker_failures=breaker_failures,
                            breaker_reset_s=breaker_reset_s, clock=clock)
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections))

    def _post(self, path: str, content: bytes, headers: dict[str, str]) -> JSON:
        if not self._p.allow():
            raise CacheUnavailableError(_BREAKER_OPEN, fix="check the service's health")
        try:
            r = self._http.post(path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise self._p.unreachable(exc) from exc
        return self._p.read(r)

    def lookup(self, request: Request, *, kind: Kind | None = None,
               cache_control: str | None = None) -> Lookup:
        """Look ``request`` (an OpenAI chat or completion body) up. ``cache_control``: the
        request's ``Cache-Control`` (``no-cache``, ``no-store``, ``max-age=N``)."""
        try:
            return self._p.lookup_result(self._post(
                "/v1/cache/lookup", self._p.lookup_body(request, kind),
                self._p.headers(cache_control)))
        except ServiceError as exc:
            return self._p.failed_lookup(exc)

    def store(self, found: Lookup, *, response: Mapping[str, Any] | None = None,
              chunks: Iterable[Mapping[str, Any]] | None = None,
              request: Request | None = None,
              ttl_seconds: int | None = None) -> Stored:
        """Store the model's complete answer (``response``, or its stream's ``chunks``) under
        the entry ``found`` (a miss) is allowed to fill. ``request``: send it again to have the
        service check it and hand the fill to its auditor."""
        if found.fill_token is None:
            return _NOTHING_TO_STORE
        try:
            return self._p.store_result(self._post(
                "/v1/cache/store",
                self._p.store_body(found, response, chunks, request, ttl_seconds),
                self._p.auth))
        except ServiceError as exc:
            return self._p.failed_store(exc)

    def fill_stream(self, found: Lookup, chunks: Iterable[JSON], *,
                    request: Mapping[str, Any] | None = None,
                    ttl_seconds: int | None = None) -> Iterator[JSON]:
        """Yield ``chunks`` unchanged; once they ended normally, store them under ``found``."""
        recorded: list[JSON] | None = [] if found.fill_token is not None else None
        for chunk in chunks:
            if recorded is not None:
                recorded.append(chunk)
            yield chunk
        if recorded is not None and stream_complete(recorded):
            self.store(found, chunks=recorded, request=request, ttl_seconds=ttl_seconds)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCacheClient:
    """The cache API over HTTP, for asyncio. One per event loop (its connections belong to
    the loop that opened them)."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 fail_open: bool = True, max_connections: int = 100, breaker_failures: int = 3,
                 breaker_reset_s: float = 5.0, transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._p = _Protocol(api_key, fail_open=fail_open, breaker_failures=breaker_failures,
                            breaker_reset_s=breaker_reset_s, clock=clock)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout_s, transport=transport,
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections))

    async def _post(self, path: str, content: bytes, headers: dict[str, str]) -> JSON:
        if not self._p.allow():
            raise CacheUnavailableError(_BREAKER_OPEN, fix="check the service's health")
        try:
            r = await self._http.post(path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise self._p.unreachable(exc) from exc
        return self._p.read(r)

    async def lookup(self, request: Request, *, kind: Kind | None = None,
                     cache_control: str | None = None) -> Lookup:
        """See ``CacheClient.lookup``."""
        try:
            return self._p.lookup_result(await self._post(
                "/v1/cache/lookup", self._p.lookup_body(request, kind),
                self._p.headers(cache_control)))
        except ServiceError as exc:
            return self._p.failed_lookup(exc)

    async def store(self, found: Lookup, *, response: Mapping[str, Any] | None = None,
                    chunks: Iterable[Mapping[str, Any]] | None = None,
                    request: Request | None = None,
                    ttl_seconds: int | None = None) -> Stored:
        """See ``CacheClient.store``."""
        if found.fill_token is None:
            return _NOTHING_TO_STORE
        try:
            return self._p.store_result(await self._post(
                "/v1/cache/store",
                self._p.store_body(found, response, chunks, request, ttl_seconds),
                self._p.auth))
        except ServiceError as exc:
            return self._p.failed_store(exc)

    async def fill_stream(self, found: Lookup, chunks: AsyncIterable[JSON], *,
                          request: Mapping[str, Any] | None = None,
                          ttl_seconds: int | None = None) -> AsyncIterator[JSON]:
        """See ``CacheClient.fill_stream``."""
        recorded: list[JSON] | None = [] if found.fill_token is not None else None
        async for chunk in chunks:
            if recorded is not None:
                recorded.append(chunk)
            yield chunk
        if recorded is not None and stream_complete(recorded):
            await self.store(found, chunks=recorded, request=request, ttl_seconds=ttl_seconds)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncCacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
