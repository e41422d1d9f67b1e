"""Builds the long-lived parts from the settings: store, registry view, upstream, observers.

Kept apart from ``app.py`` so the app factory reads as a list of parts, and so each part's
construction (which imports the other packages) happens only when that part is wanted.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import structlog

from cachesvc.events import CacheObserver
from cachesvc.settings import Settings

if TYPE_CHECKING:
    # Types only: each part's module is imported when that part is built (see the docstring).
    from audit.protocols import Oracle
    from audit.recorder import Recorder
    from cachesvc.models import ModelVersions
    from cachesvc.store import EntryKeys
    from cachesvc.store.base import ResponseStore
    from cachesvc.upstream import Upstream
    from gpu_prefix.drift_sampler import DriftSamplerConfig
    from gpu_prefix.engine import Engine

log = structlog.get_logger()


async def open_store(settings: Settings) -> ResponseStore:
    """The embedded store, or Redis (standalone or Cluster) when ``[redis]`` names one."""
    from cachesvc.store import open_store as _open

    timeout = settings.redis.timeout_ms / 1000
    return _open(settings.redis.url, nodes=settings.redis.nodes or None,
                 max_bytes=settings.embedded.max_bytes,
                 max_entry_bytes=settings.limits.max_entry_bytes,
                 socket_timeout=timeout, connect_timeout=max(timeout, 0.1),
                 # NOTE: no retries inside the store: the request path's answer to a failed
                 # call is a miss, and the circuit breaker decides when to try again.
                 retries=0)


async def open_versions(settings: Settings, store: ResponseStore) -> ModelVersions:
    from cachesvc.models import open_versions as _open

    return await _open(store, refresh_s=settings.cache.registry_refresh_s,
                       strict=settings.cache.strict_epoch)


async def open_upstream(settings: Settings, versions: ModelVersions) -> Upstream:
    """An HTTP upstream when ``[upstream] url`` is set, else the reference engine in process."""
    from cachesvc.upstream import EngineUpstream, HttpUpstream

    if settings.upstream.url:
        return HttpUpstream(settings.upstream.url, api_key=settings.upstream.api_key,
                            timeout_s=settings.upstream.timeout_s)
    import asyncio

    from cachesvc.engine_metrics import register_default

    engine = await asyncio.to_thread(load_engine, settings)
    await attach_engine(engine, versions, settings.upstream.version)
    register_default(engine)
    return EngineUpstream(engine)


def load_engine(settings: Settings) -> Engine:
    from gpu_prefix.engine import Engine

    device = settings.upstream.device
    e = settings.engine
    log.info("engine_loading", model=settings.upstream.model, device=device)
    return Engine.from_name(settings.upstream.model, device=device,
                            model_id=settings.upstream.model,
                            pool_bytes=e.pool_mb * 2**20, block_size=e.block_size,
                            max_running=e.max_running,
                            max_batch_tokens=e.max_batch_tokens, max_queue=e.max_queue,
                            queue_timeout_s=e.queue_timeout_s, high_watermark=e.high_watermark,
                            max_tokens_limit=e.max_tokens_limit, kv_dtype=e.kv_dtype,
                            drift_sampling=drift_sampling(settings))


def drift_sampling(settings: Settings) -> DriftSamplerConfig:
    from gpu_prefix.drift_sampler import DriftSamplerConfig

    e = settings.engine
    return DriftSamplerConfig(rate=e.drift_sample_rate,
                              tokens_per_minute=e.drift_sample_tokens_per_minute,
                              max_queue=e.drift_sample_queue, seed=e.drift_sample_seed)


def watch_drift(settings: Settings, engine: Engine | None, recorder: Recorder | None,
                stack: contextlib.AsyncExitStack) -> None:
    """An INT8 engine's drift watch: the background sampler's trips become findings, and the
    periodic drift audit (``[engine] drift_audit_every_h``) runs at start and then on its
    interval."""
    if engine is None or engine.kv_dtype != "int8":
        return
    import asyncio

    from audit.drift import run_drift_audit, trip_recorder
    from gpu_prefix.drift import corpus

    if recorder is not None and engine.drift_sampler is not None:
        engine.drift_sampler.on_trip = trip_recorder(recorder, engine)
    every_h = settings.engine.drift_audit_every_h
    if every_h <= 0:
        return
    e = settings.engine

    async def periodic() -> None:
        while engine.kv_dtype == "int8":
            try:
                await asyncio.to_thread(run_drift_audit, engine,
                                        corpus(engine, prompts=e.drift_audit_prompts),
                                        max_tokens=e.drift_audit_max_tokens, recorder=recorder,
                                        journal=recorder.journal if recorder is not None else None)
            except Exception as exc:  # noqa: BLE001 - a failed audit must not stop serving
                log.warning("drift_audit_failed", error=str(exc)[:200])
            await asyncio.sleep(every_h * 3600)

    task = asyncio.get_running_loop().create_task(periodic())

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)


async def attach_engine(engine: Engine, versions: ModelVersions, version: str) -> None:
    """Register the engine's model if the registry has never seen it, and follow its
    rollouts: a new epoch drops the old epoch's prefix blocks from the engine's pool.

    NOTE: start-up never changes a model the registry knows. A configured version that is not
    the registry's refuses to start (:class:`RegistryConflictError`): rolling the registry to
    the config's version would invalidate the whole cache for every replica (a stale config
    rolls back), and serving under the registry's epoch would store this process's answers as
    another version's. Rollouts are explicit (`cachesvc models rollout`)."""
    import asyncio

    from cachesvc.errors import RegistryConflictError

    model = engine.model_id
    try:
        current, epoch = await versions.adopt(model, version)
    except Exception as exc:  # noqa: BLE001 - a down registry must not stop start-up
        log.warning("engine_registration_failed", model=model, error=str(exc)[:200])
    else:
        if current != version:
            raise RegistryConflictError(
                f"the registry serves model {model!r} at version {current!r} (epoch {epoch}), "
                f"but [upstream] version is {version!r}: set [upstream] version = {current!r} "
                f"if these are its weights, or roll out explicitly with `cachesvc models "
                f"rollout {model} {version}` (a new epoch: every cached entry of the model "
                "becomes unreachable)")
        if epoch != engine.model_epoch:
            await asyncio.to_thread(engine.on_rollout, None, epoch)

    async def on_epoch(changed: str, old: int | None, new: int) -> None:
        if changed == model and new != engine.model_epoch:
            await asyncio.to_thread(engine.on_rollout, None, new)

    versions.subscribe(on_epoch)


async def open_observers(settings: Settings, upstream: Upstream, versions: ModelVersions,
                         stack: contextlib.AsyncExitStack, keys: EntryKeys
                         ) -> list[CacheObserver]:
    """The shadow auditor as an observer, started now and stopped at shutdown (``[audit]``).

    NOTE: it runs even with both sample rates at 0, because entries the service refuses are
    always handed to it, so each refusal is a durable finding."""
    if not settings.audit.enabled:
        watch_drift(settings, getattr(upstream, "engine", None), None, stack)
        return []
    import asyncio

    from cachesvc.auditing import (
        EngineOracle,
        LoopRegistryView,
        ShadowObserver,
        UpstreamOracle,
        build_shadow_auditor,
    )

    oracle: Oracle | None = None
    engine = getattr(upstream, "engine", None)
    if settings.audit.oracle == "engine" and engine is not None:
        oracle = EngineOracle(engine)
    elif settings.audit.oracle == "upstream" and settings.upstream.url:
        oracle = UpstreamOracle(settings.upstream.url, api_key=settings.upstream.api_key)
    elif settings.audit.oracle != "none":
        log.warning("audit_oracle_unavailable", oracle=settings.audit.oracle,
                    detail="provenance checks only; set [audit] oracle to match the upstream")
    auditor = build_shadow_auditor(
        settings, keys=keys, oracle=oracle,
        registry_view=LoopRegistryView(versions, asyncio.get_running_loop()))
    auditor.start()
    # NOTE: stop() drains the queue and may wait on registry reads that run on this loop, so
    # it runs in a thread, not on the loop itself.
    stack.push_async_callback(asyncio.to_thread, auditor.stop, timeout=5.0)
    watch_drift(settings, engine, auditor.recorder, stack)
    return [ShadowObserver(auditor)]
