"""Exception handlers: every error is JSON in the OpenAI error shape, naming the field and fix.

Bad input is a 4xx, never a 500; upstream errors pass through with the upstream's own status.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cachesvc.api.responses import OrjsonResponse
from cachesvc.body_limit import BodyRefused, refusal
from cachesvc.errors import ServiceError, UpstreamError

log = structlog.get_logger()


def error_body(message: str, *, type_: str, code: str | None, param: str | None = None,
               fix: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    if fix:
        err["fix"] = fix
    return {"error": err}


def install(app: FastAPI) -> None:
    @app.exception_handler(UpstreamError)
    async def _upstream(request: Request, exc: UpstreamError) -> OrjsonResponse:
        body = exc.body if isinstance(exc.body, dict) else error_body(
            str(exc), type_="upstream_error", code=None)
        return OrjsonResponse(body, status_code=exc.status,
                              headers={"X-Cache": "MISS", **exc.headers})

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> OrjsonResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.status == 504:
            headers["X-Cache"] = "MISS"
        message = exc.message if not exc.field else f"{exc.field}: {exc.message}"
        return OrjsonResponse(
            error_body(message, type_="invalid_request_error" if exc.status < 500 else
                       "cache_error", code=exc.code, param=exc.field, fix=exc.fix),
            status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> OrjsonResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid"}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return OrjsonResponse(
            error_body(f"{field}: {first.get('msg')}", type_="invalid_request_error",
                       code="invalid_request", param=field,
                       fix="see the OpenAPI schema at /openapi.json for this endpoint"),
            status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client left mid-body, or the server closed it as too slow: nobody reads an
        # answer, and no traceback is logged (one per slow client would be a cheap attack).
        return Response(status_code=400, headers={"connection": "close"})

    @app.exception_handler(BodyRefused)
    async def _body(request: Request, exc: BodyRefused) -> Response:
        status, headers, body = refusal(exc)
        return Response(body, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> OrjsonResponse:
        return OrjsonResponse(error_body(str(exc.detail), type_="invalid_request_error",
                                         code=str(exc.status_code)),
                              status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> OrjsonResponse:
        log.exception("unhandled_error", path=request.url.path)
        return OrjsonResponse(error_body("internal error; see the service log",
                                         type_="server_error", code="internal_error"),
                              status_code=500)
