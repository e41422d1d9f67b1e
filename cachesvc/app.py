"""The FastAPI application: ``create_app(settings)``.

Long-lived objects (store, registry view, upstream, observers) are built in the lifespan from
the settings, unless the caller passes them in (tests and embedders do). Routers live in
``cachesvc/api/``; every dependency can be swapped with ``app.dependency_overrides``.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from cachesvc import heap, metrics
from cachesvc.access_log import AccessLog
from cachesvc.api import admin, cache, health, proxy
from cachesvc.api import errors as api_errors
from cachesvc.api.deps import Services
from cachesvc.api.lean import CacheApp
from cachesvc.api.responses import OrjsonResponse
from cachesvc.body_limit import BodyLimit
from cachesvc.breaker import CircuitBreaker
from cachesvc.events import CacheObserver
from cachesvc.fill_token import FillTokenSigner
from cachesvc.guarded_store import GuardedStore
from cachesvc.response_cache import ResponseCache
from cachesvc.settings import Settings
from cachesvc.single_flight import SingleFlight
from cachesvc.state import state_value
from cachesvc.store.mac import EntryKeys
from cachesvc.tenants import TenantDirectory

if TYPE_CHECKING:
    from cachesvc.models import ModelVersions
    from cachesvc.store.base import ResponseStore
    from cachesvc.upstream import Upstream

log = structlog.get_logger()


def service_secret(settings: Settings) -> bytes:
    """The secret for fill tokens and material digests.

    NOTE: every worker and replica sharing a store must use the same secret, or each one's
    entries fail the others' material-digest check (safe, but all misses). Unset, it is read
    from (or created once in) ``<state_dir>/secret``, which workers on one host share.
    """
    if settings.cache.secret:
        return settings.cache.secret.encode()
    return state_value(Path(settings.state_dir) / "secret",
                       lambda: secrets.token_hex(32)).encode()


#: Routes whose bodies are OpenAI requests (bounded by limits.max_request_bytes).
_REQUEST_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/cache/lookup"})


def body_limits(settings: Settings) -> Callable[[str], tuple[int, str]]:
    """Each route's body limit and the setting it comes from: requests, a store (a request and
    an answer), every other route."""
    lim = settings.limits
    request = (lim.max_request_bytes, "limits.max_request_bytes")
    store = (lim.max_request_bytes + 2 * lim.max_entry_bytes,
             "limits.max_request_bytes + 2 * limits.max_entry_bytes")
    other = (lim.max_other_body_bytes, "limits.max_other_body_bytes")

    def limit_for(path: str) -> tuple[int, str]:
        if path in _REQUEST_ROUTES:
            return request
        return store if path == "/v1/cache/store" else other

    return limit_for


def create_app(
    settings: Settings,
    *,
    upstream: Upstream | None = None,
    store: ResponseStore | None = None,
    versions: ModelVersions | None = None,
    observers: Sequence[CacheObserver] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app. Anything not passed is created from ``settings`` at start-up.
    ``on_ready()`` runs once everything (the engine's model included) is loaded."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            services = await _build(settings, stack, upstream=upstream, store=store,
                                    versions=versions, observers=observers)
            app.state.services = services
            metrics.watch_store(services.store)
            log.info("cachesvc_ready", tenants=len(settings.tenants),
                     store=type(services.store).__name__,
                     upstream=type(services.upstream).__name__)
            # Before on_ready: a caller told the service is ready must not wait on the collect.
            frozen = heap.freeze()
            log.debug("heap_frozen", objects=frozen)
            if on_ready is not None:
                on_ready()
            try:
                yield
            finally:
                heap.thaw()
            for task in list(services.background):
                task.cancel()
            app.state.services = None
            metrics.watch_store(None)

    # NOTE: FastAPIOffline is FastAPI whose /docs and /redoc load their scripts from files this
    # process serves (the fastapi-offline package), not from a CDN: they work with no internet.
    # Made a CacheApp, it serves the hot routes (proxy, lookup) past FastAPI's per-request layers
    # (cachesvc/api/lean.py).
    app = CacheApp.adopt(FastAPIOffline(
        static_url="/docs/assets",
        title="cachesvc",
        version="0.1.0",
        summary="A response cache for LLM inference that can prove it is right.",
        default_response_class=OrjsonResponse,
        lifespan=lifespan,
    ))
    # NOTE: an edge middleware, so the lean hot routes pass it too (cachesvc/api/lean.py).
    app.add_edge_middleware(BodyLimit, limit_for=body_limits(settings),
                            drain_s=settings.limits.body_timeout_s)
    api_errors.install(app)
    if settings.logging.access_log:
        # An edge middleware too, so it logs the lean hot routes (it runs before the body limit).
        app.add_edge_middleware(AccessLog, max_per_s=settings.logging.access_log_max_per_s)
    app.include_router(proxy.router)
    app.include_router(cache.router)
    app.include_router(admin.router)
    app.include_router(health.router)
    return app


async def _build(settings: Settings, stack: contextlib.AsyncExitStack, *,
                 upstream: Upstream | None, store: ResponseStore | None,
                 versions: ModelVersions | None, observers: Sequence[CacheObserver] | None
                 ) -> Services:
    from cachesvc import wiring

    secret = service_secret(settings)
    # The service secret signs entries and fill tokens; it and the rotated-out secrets verify.
    previous = [s.encode() for s in settings.cache.previous_secrets]
    keys = EntryKeys(secret, previous)
    if store is None:
        store = await wiring.open_store(settings)
        stack.push_async_callback(store.close)
    if versions is None:
        versions = await wiring.open_versions(settings, store)
        stack.push_async_callback(versions.aclose)
    if upstream is None:
        upstream = await wiring.open_upstream(settings, versions)
        stack.push_async_callback(upstream.aclose)
    if observers is None:
        observers = await wiring.open_observers(settings, upstream, versions, stack, keys)
    breaker = CircuitBreaker(
        failures=settings.breaker.failures, reset_after_s=settings.breaker.reset_after_s,
        on_change=lambda s: metrics.BREAKER_STATE.set(metrics.BREAKER_VALUES[s]))
    metrics.BREAKER_STATE.set(0)
    guard = GuardedStore(store, timeout_s=settings.redis.timeout_ms / 1000, breaker=breaker)
    rc = ResponseCache(store=store, guard=guard, versions=versions, secret=secret, keys=keys,
                       observers=tuple(observers), max_entry_bytes=settings.limits.max_entry_bytes,
                       max_ttl_s=settings.limits.max_ttl_seconds,
                       max_request_bytes=settings.limits.max_request_bytes,
                       strict_epoch=settings.cache.strict_epoch,
                       store_material=settings.cache.store_material)
    return Services(settings=settings, tenants=TenantDirectory(settings), cache=rc,
                    upstream=upstream, flights=SingleFlight(),
                    signer=FillTokenSigner(secret, previous=previous,
                                           ttl_s=settings.cache.fill_token_ttl_s),
                    versions=versions, store=store)
