"""The reference engine over HTTP: an OpenAI-compatible upstream for the cache and the auditor.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (SSE when ``stream: true``),
``GET /v1/models``, ``GET /healthz``, ``GET /metrics``. The tenant comes from the Bearer key
(``api_keys`` maps key -> tenant); with no keys configured everyone is tenant ``anonymous``.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Mapping

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cachesvc import engine_api
from cachesvc.engine_metrics import engine_registry
from cachesvc.streaming import DONE, sse
from gpu_prefix.engine import Engine

ANONYMOUS = "anonymous"


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    etype = {401: "authentication_error", 404: "not_found_error", 503: "overloaded_error"}.get(
        status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": etype, "param": param,
                                   "code": code}},
                        status_code=status, headers=dict(headers or {}))


def _request_error(exc: engine_api.EngineRequestError) -> JSONResponse:
    headers = {}
    if isinstance(exc, engine_api.EngineOverloadedError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return _error(exc.status, exc.message, param=exc.field, headers=headers)


def create_engine_app(engine: Engine, *, api_keys: Mapping[str, str] | None = None) -> FastAPI:
    """Build the app over ``engine`` (an engine built with ``isolate_tenants=False`` lets
    tenants share prefix blocks: the timing audit uses one to show the side channel)."""
    keys = dict(api_keys or {})
    app = FastAPI(title="provable-llm-cache reference engine")
    registry = engine_registry(engine)
    app.state.engine = engine

    def tenant_of(request: Request) -> str | None:
        if not keys:
            return ANONYMOUS
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        for key, tenant in keys.items():
            if hmac.compare_digest(key.encode(), token.strip().encode()):
                return tenant
        return None

    async def handle(request: Request, kind: engine_api.Kind) -> Response:
        tenant = tenant_of(request)
        if tenant is None:
            return _error(401, "missing or unknown API key; send Authorization: Bearer <key>",
                          code="invalid_api_key")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "body: not valid JSON; send a JSON object", param="body")
        if not isinstance(body, dict):
            return _error(400, "body: must be a JSON object", param="body")
        try:
            if not body.get("stream"):
                return JSONResponse(await engine_api.complete(engine, body, kind, tenant=tenant))
            agen = engine_api.stream(engine, body, kind, tenant=tenant)
            # The first chunk comes before the response starts, so a bad request or a refusal is
            # a proper 4xx/503 instead of an error inside a 200 stream.
            first = await agen.__anext__()
        except engine_api.EngineRequestError as exc:
            return _request_error(exc)
        except StopAsyncIteration:
            first = None

        async def events() -> AsyncIterator[bytes]:
            try:
                if first is not None:
                    yield sse(first)
                    async for chunk in agen:
                        yield sse(chunk)
                yield DONE
            except engine_api.EngineRequestError as exc:
                yield sse({"error": {"message": exc.message, "type": "invalid_request_error",
                                     "param": exc.field}})
            finally:
                await agen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, "completion")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if tenant_of(request) is None:
            return _error(401, "missing or unknown API key; send Authorization: Bearer <key>",
                          code="invalid_api_key")
        return JSONResponse({"object": "list", "data": [
            {"id": engine.model_id, "object": "model", "created": 0,
             "owned_by": "provable-llm-cache"}]})

    @app.get("/healthz")
    async def healthz() -> Response:
        s = engine.stats()
        return JSONResponse({"status": "ok", "model": engine.model_id,
                             "model_epoch": engine.model_epoch,
                             "kv_pool_usage": s.usage, "running": s.running, "queued": s.queued})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
