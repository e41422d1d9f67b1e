"""``POST /v1/chat/completions`` and ``POST /v1/completions``: the read-through proxy.

Hit: the verified entry, as JSON or replayed as SSE, with ``X-Cache: HIT`` and ``Age``.
Miss: one upstream call per key and process (single-flight); the answer streams through while
it is recorded, and is stored only once complete. Bypass: straight to the upstream, never stored.
Upstream errors pass through with their own status and are never stored.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from cachesvc import access_log, metrics
from cachesvc.api.deps import Services, hot_path_caller, read_json_body
from cachesvc.api.lean import lean
from cachesvc.api.responses import EncodedJsonResponse, OrjsonResponse
from cachesvc.api.schemas import ERROR_RESPONSES, proxy_openapi
from cachesvc.cache_control import parse_cache_control
from cachesvc.errors import OnlyIfCachedMissError, UpstreamError
from cachesvc.response_cache import Keyed, Payload
from cachesvc.streaming import DONE, body_complete, sse, stream_complete
from cachesvc.tenants import Tenant

log = structlog.get_logger()
router = APIRouter(tags=["proxy"])

_HIT = (b"x-cache", b"HIT")


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES,
             openapi_extra=proxy_openapi("chat"), response_model=None)
@lean
async def chat_completions(request: Request) -> Response:
    """OpenAI-compatible chat completions, served from the cache when it can prove it may."""
    services, tenant = hot_path_caller(request)
    return await _proxy(request, services, tenant, "chat")


@router.post("/v1/completions", responses=ERROR_RESPONSES,
             openapi_extra=proxy_openapi("completion"), response_model=None)
@lean
async def completions(request: Request) -> Response:
    """OpenAI-compatible (legacy) text completions, served from the cache when it may."""
    services, tenant = hot_path_caller(request)
    return await _proxy(request, services, tenant, "completion")


async def _proxy(request: Request, services: Services, tenant: Tenant, kind: str) -> Response:
    raw, body = await read_json_body(request, services.settings.limits.max_request_bytes)
    cc = parse_cache_control(request.headers.get("cache-control"))
    keyed = await services.cache.key(tenant, body, kind, raw=raw)
    access_log.note(request.scope, digest=keyed.key.digest)
    result = await services.cache.lookup(keyed, cc, route="proxy")
    if services.settings.logging.log_content:
        # Off by default: prompts are the tenants' data. Enabled only for debugging.
        log.info("request_content", tenant=tenant.id, status=result.status, request=body)
    if result.status == "hit":
        assert result.payload is not None
        services.cache.notify("hit", keyed, result.raw, result.entry, result.payload)
        if not keyed.stream:
            return EncodedJsonResponse(services.bodies.body(result.payload, keyed.kind),
                                       [_HIT, (b"age", b"%d" % (result.age or 0))])
        return _serve(keyed, result.payload, {"X-Cache": "HIT", "Age": str(result.age or 0)})
    if cc.only_if_cached:
        raise OnlyIfCachedMissError(
            f"only-if-cached and the cache has no usable entry ({result.reason})",
            field="Cache-Control", fix="retry without only-if-cached to call the model")
    if result.status == "bypass":
        return await _call(services, keyed, store=False,
                           headers={"X-Cache": "BYPASS", "X-Cache-Reason": _ascii(result.reason)})
    headers = {"X-Cache": "MISS", "X-Cache-Reason": _ascii(result.reason)}
    if cc.no_store:
        return await _call(services, keyed, store=False, headers=headers)
    if cc.no_cache:
        # The client asked for a fresh answer: do not take a fill that started before it asked.
        return await _call(services, keyed, store=True, headers=headers)
    flight, leader = services.flights.join(keyed.flight_key)
    if not leader:
        shared = await services.flights.wait(flight,
                                             services.settings.cache.single_flight_wait_s)
        if isinstance(shared, Payload):
            metrics.COALESCED.inc()
            return _serve(keyed, shared, {**headers, "X-Cache-Coalesced": "1"})
        return await _call(services, keyed, store=True, headers=headers)
    return await _call(services, keyed, store=True, headers=headers,
                       on_done=lambda p: services.flights.finish(keyed.flight_key, flight, p))


def _serve(keyed: Keyed, payload: Payload, headers: dict[str, str]) -> Response:
    if keyed.stream:
        chunks = payload.as_chunks(keyed.kind, include_usage=keyed.include_usage)

        async def replay() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield sse(chunk)
            yield DONE

        return StreamingResponse(replay(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    return OrjsonResponse(payload.as_body(keyed.kind), headers=headers)


async def _call(services: Services, keyed: Keyed, *, store: bool, headers: dict[str, str],
                on_done: Any = None) -> Response:
    """Call the upstream; store a complete answer when ``store``; ``on_done(payload | None)``
    publishes the outcome to single-flight followers (exactly once, whatever happens)."""
    done = _Once(on_done)
    upstream = services.upstream
    t0 = time.perf_counter()
    if not keyed.stream:
        with _failing_upstream(done, headers):
            body = await upstream.complete(keyed.body, keyed.kind, tenant=keyed.tenant.id)
        metrics.UPSTREAM_LATENCY.labels(keyed.kind).observe(time.perf_counter() - t0)
        payload = Payload(stream=False, body=body)
        if store and body_complete(body):
            await services.cache.fill(keyed.target, payload, source="proxy", keyed=keyed)
        done(payload)
        return OrjsonResponse(body, headers=headers)

    # Streaming: take the first chunk before answering, so an upstream error keeps its status.
    agen = upstream.stream(keyed.body, keyed.kind, tenant=keyed.tenant.id)
    with _failing_upstream(done, headers):
        try:
            first = await agen.__anext__()
        except StopAsyncIteration:
            first = None
    metrics.UPSTREAM_LATENCY.labels(keyed.kind).observe(time.perf_counter() - t0)

    async def relay() -> AsyncIterator[bytes]:
        recorded: list[dict[str, Any]] = []
        ended = False
        try:
            if first is not None:
                recorded.append(first)
                yield sse(first)
                async for chunk in agen:
                    recorded.append(chunk)
                    yield sse(chunk)
            ended = True
        except UpstreamError as exc:
            metrics.count_upstream_error(exc.status)
            log.warning("upstream_stream_broke", status=exc.status)
            body = exc.body if isinstance(exc.body, dict) else {"error": {"message": str(exc)}}
            yield sse(body)
            done(None)
            return
        finally:
            if not ended:
                done(None)
                await agen.aclose()
        # NOTE: stored only after the upstream said [DONE] and every choice has a
        # finish_reason; a cut stream (client gone, upstream broke) is never an entry.
        payload = Payload(stream=True, chunks=recorded)
        if store and stream_complete(recorded):
            await services.cache.fill(keyed.target, payload, source="proxy", keyed=keyed)
            done(payload)
        else:
            done(None)
        yield DONE

    return StreamingResponse(relay(), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache"})


def _ascii(s: str) -> str:
    return s.encode("ascii", "replace").decode()[:200]


@contextlib.contextmanager
def _failing_upstream(done: _Once, headers: dict[str, str]) -> Iterator[None]:
    """An upstream call that fails releases the single-flight followers (``done(None)``); an
    upstream error keeps its status and gets this response's cache headers."""
    try:
        yield
    except UpstreamError as exc:
        metrics.count_upstream_error(exc.status)
        done(None)
        exc.headers = {**exc.headers, **headers}
        raise
    except BaseException:
        done(None)
        raise


class _Once:
    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, payload: Payload | None) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn(payload)

