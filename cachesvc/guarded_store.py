"""The response store as the request path sees it: bounded, guarded, and never raising.

Every call has a timeout: the guard's, or the store's own where the store keeps one no longer
(``own_timeout_s``: the Redis store's pipelined GET, whose watchdog bounds every GET; a second
timer per hit would only repeat it). An error or timeout counts against the circuit breaker and
is reported as "nothing there" (get) or "not written" (put). While the breaker is open the store is
not called at all, and once ``reset_after_s`` has passed a single probe call tests recovery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

from cachesvc import metrics
from cachesvc.breaker import CircuitBreaker

T = TypeVar("T")
log = structlog.get_logger()

_FAILED = object()


_OPS = ("get", "put", "delete", "claim")


class GuardedStore:
    def __init__(self, store: Any, *, timeout_s: float, breaker: CircuitBreaker) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self.breaker = breaker
        own = getattr(store, "own_timeout_s", None)
        #: Operations the store bounds itself within ``timeout_s``: no timer of the guard's.
        self.self_bounded = frozenset(
            op for op in _OPS
            if own is not None and (t := own(op)) is not None and t <= timeout_s)

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T | object:
        """Run ``fn()`` under the timeout and breaker; ``_FAILED`` when it did not succeed."""
        if not self.breaker.allow():
            metrics.STORE_SKIPPED.labels(op).inc()
            return _FAILED
        try:
            if op in self.self_bounded:
                result = await fn()
            else:
                # asyncio.timeout, not wait_for: no extra task per call on the hot path.
                async with asyncio.timeout(self.timeout_s):
                    result = await fn()
        except asyncio.CancelledError:
            self.breaker.failure()
            raise
        except Exception as exc:  # noqa: BLE001 - any store failure is a miss, never a 5xx
            self.breaker.failure()
            name = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            metrics.STORE_ERRORS.labels(op, name).inc()
            log.warning("store_error", op=op, error=name, breaker=self.breaker.state)
            return _FAILED
        self.breaker.success()
        return result

    @staticmethod
    def failed(result: object) -> bool:
        return result is _FAILED
