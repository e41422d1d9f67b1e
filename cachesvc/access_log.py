"""The access log: one structured line per HTTP request, never its content.

Each line (structlog event ``access``) carries the method, the route template (``/admin/
tenants/{tenant}/entries``, not the filled-in path), the status, ``X-Cache``, the tenant, the
latency in milliseconds, and the entry digest when the request was keyed. It never carries a
prompt, an answer, a header value other than ``X-Cache``, a query string or an API key: the
fields are taken from the request line, the response start and two values the routes note on
the request (:func:`note`), never from a body.

Two ways in, one line format:

* :class:`AccessLog`, pure ASGI middleware (no Starlette ``BaseHTTPMiddleware``, which would
  copy every streamed body through a queue): ``create_app`` installs it;
* :func:`log_access`, for a lean ASGI hot path that bypasses the middleware stack: call it once
  per request with what it knows.

Cost and the rate limit: a line costs tens of microseconds of CPU (structlog's time stamp, JSON
and the write; ``bench/access_log.py`` measures it), a real share of a cache hit's few hundred.
So successful requests (statuses below 400) are logged up to ``[logging] access_log_max_per_s``
lines per second (a token bucket; 100 by default: every request of a quiet service, a bounded
cost on a busy one), and the lines left out are counted in ``cachesvc_access_log_suppressed``.
Every 4xx and 5xx (a 401 included) is always logged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import Counter

_log = structlog.get_logger("cachesvc.access")
SUPPRESSED = Counter("cachesvc_access_log_suppressed", "Successful requests not written to the "
                     "access log: over [logging] access_log_max_per_s.")

#: Keys on the ASGI scope's ``state`` dict that the routes fill in (see :func:`note`).
TENANT = "access_tenant"
DIGEST = "access_digest"
#: The tenant field of a request made with the admin key.
ADMIN = "(admin)"


def note(scope: Any, *, tenant: str | None = None, digest: bytes | None = None) -> None:
    """Record the request's tenant and entry digest for its access-log line."""
    state = scope.setdefault("state", {})
    if tenant is not None:
        state[TENANT] = tenant
    if digest is not None:
        state[DIGEST] = digest


def log_access(*, method: str, route: str, status: int, cache: str | None,
               tenant: str | None, latency_s: float, digest: bytes | None = None) -> None:
    """Write one access-log line (the function a hot path calls itself)."""
    _log.info("access", method=method, route=route, status=status, cache=cache or "-",
              tenant=tenant or "-", latency_ms=round(latency_s * 1000, 3),
              digest=digest.hex() if digest else None)


class AccessLog:
    """ASGI middleware writing :func:`log_access` lines; see the module docstring."""

    def __init__(self, app: Any, *, max_per_s: float = 100.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.app = app
        self.max_per_s = max_per_s
        self.clock = clock
        self._tokens = max_per_s  # a full second's worth
        self._refilled = clock()

    def _admit_success(self, now: float) -> bool:
        """Take a token for one successful request's line; False over the rate."""
        self._tokens = min(self.max_per_s,
                           self._tokens + (now - self._refilled) * self.max_per_s)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        SUPPRESSED.inc()
        return False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = self.clock()
        seen: dict[str, Any] = {"status": 500, "cache": None}

        async def send_and_watch(message: Any) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-cache":
                        seen["cache"] = value.decode("latin-1")
                        break
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            status = seen["status"]
            now = self.clock()
            if status >= 400 or self._admit_success(now):
                route = scope.get("route")
                state = scope.get("state") or {}
                log_access(method=scope["method"],
                           route=getattr(route, "path", None) or _unmatched(scope),
                           status=status, cache=seen["cache"], tenant=state.get(TENANT),
                           latency_s=now - start, digest=state.get(DIGEST))


def _unmatched(scope: Any) -> str:
    """No route matched (a 404): the path, cut short so a long junk path cannot flood the log."""
    return str(scope.get("path", "-"))[:200]
