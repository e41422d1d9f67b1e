"""The hot routes served without FastAPI's per-request layers.

A gateway calls ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/cache/lookup`` on
every model request, so their cost is paid on the critical path of every call. Profiled under
load (py-spy, bench/service.py), the middleware stack, the router and FastAPI's request handler
took more CPU than the cache hit itself. :class:`CacheApp` therefore sends these routes, matched
by exact method and path, straight to their endpoint functions: the same functions the FastAPI
routes declare, with the same exception handlers turning errors into responses. FastAPI still
serves every other route, describes these in its OpenAPI schema, and runs the lifespan.

A route joins the lean path by decorating its endpoint with :func:`lean`; its endpoint takes the
``Request`` alone and resolves its caller itself (``deps.hot_path_caller``), since no dependency
is solved for it here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]

_LEAN: set[Callable[..., Any]] = set()


def lean(endpoint: Endpoint) -> Endpoint:
    """Mark a route's endpoint for the lean path (apply below the router's decorator)."""
    _LEAN.add(endpoint)
    return endpoint


class CacheApp(FastAPI):
    """FastAPI, with the routes marked :func:`lean` dispatched before the framework's layers.

    NOTE: with any middleware added by ``add_middleware`` there is no lean path at all: such a
    middleware must see every request, so every route then takes the full stack. What must run
    for every route and may run before routing goes in with :meth:`add_edge_middleware`.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._start_lean()

    @classmethod
    def adopt(cls, app: FastAPI) -> CacheApp:
        """``app`` itself, made a CacheApp: for an app that a factory built as a plain FastAPI
        (fastapi-offline's ``FastAPIOffline``). Routers included earlier stay off the lean path.

        NOTE: a class change rather than a wrapper, so that everything holding the app (tests,
        servers, ``dependency_overrides``, ``state``) holds the FastAPI object itself.
        """
        app.__class__ = cls
        assert isinstance(app, cls)
        app._start_lean()
        return app

    def _start_lean(self) -> None:
        self._lean_routes: dict[str, Endpoint] = {}
        self._edge: ASGIApp = self._dispatch

    def add_edge_middleware(self, middleware: Callable[..., ASGIApp], **options: Any) -> None:
        """Put ``middleware(app, **options)`` in front of every request, lean or not, before
        routing (the last one added runs first). For what every route must pass, such as the
        body limit; ``add_middleware`` instead takes every route off the lean path."""
        self._edge = middleware(self._edge, **options)

    def include_router(self, router: APIRouter, *, prefix: str = "", **kwargs: Any) -> None:
        """``FastAPI.include_router``; the router's :func:`lean` POST routes join the lean
        path at their full path."""
        super().include_router(router, prefix=prefix, **kwargs)
        for r in router.routes:
            if isinstance(r, APIRoute) and r.endpoint in _LEAN and r.methods == {"POST"}:
                self._lean_routes[prefix + r.path] = r.endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._edge(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self._lean_routes.get(scope["path"])
            if (endpoint is not None and not self.user_middleware and not self.root_path
                    and not scope.get("root_path")):
                await self._serve_lean(endpoint, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _serve_lean(self, endpoint: Endpoint, scope: Scope, receive: Receive,
                          send: Send) -> None:
        scope["app"] = self  # what Request.app reads, as Starlette sets it
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except Exception as exc:  # noqa: BLE001 - answered by the app's own handlers
            response = await self._handle(request, exc)
        await response(scope, receive, send)

    async def _handle(self, request: Request, exc: Exception) -> Response:
        """The response the app's exception handlers give ``exc`` (most specific class first,
        as Starlette looks them up); re-raised when none applies."""
        for cls in type(exc).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                return await handler(request, exc)  # type: ignore[misc,no-any-return]  # async handlers only
        raise exc
