"""Switching an INT8 engine's KV storage to full precision, for the whole model or some layers:
what the drift guard does when drift exceeds its thresholds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import structlog

from gpu_prefix.pool import KVPool
from gpu_prefix.store import PrefixStore

if TYPE_CHECKING:
    from gpu_prefix.engine import Engine

log = structlog.get_logger()


def disable_int8(engine: Engine, reason: str, layers: Iterable[int] | None) -> int:
    """What ``Engine.disable_int8`` does, under its INT8 lock: rebuild the pool and store in the
    new storage and swap them into the scheduler. Returns the blocks dropped."""
    old = engine.store
    quant = old.pool.quant
    if engine.kv_dtype != "int8" or quant is None:
        return 0
    full = quant.full_layers | frozenset(int(x) for x in (layers or ()))
    whole = layers is None or full >= frozenset(range(engine.shape.num_layers))
    if not whole and full == quant.full_layers:
        return 0
    dropped = old.pool.num_used
    # NOTE: only the planted scale rules go on (into a storage of no blocks), and this frame lets
    # the old storage go, so new_store can free it before allocating the new pool.
    rules = quant.like(0)
    del quant

    def new_store() -> PrefixStore:
        # let the INT8 storage go before allocating (the old pool is never used again)
        old.pool.tensor = old.pool.quant = None  # type: ignore[assignment]
        if whole:
            engine.pool = KVPool(engine.shape, budget_bytes=engine.pool_bytes,
                                 block_size=old.block_size, device=engine.device)
        else:
            engine.pool = KVPool(engine.shape, budget_bytes=engine.pool_bytes,
                                 block_size=old.block_size,
                                 device=engine.device, kv_dtype="int8", full_layers=full)
            assert engine.pool.quant is not None
            # NOTE: the layers left INT8 keep being quantized as before (the same scale rules).
            engine.pool.quant.copy_rules_from(rules)
        engine.store = PrefixStore(engine.pool)
        return engine.store

    with engine._model_lock:
        if whole:
            engine.kv_dtype = "full"
        engine.scheduler.replace_store(new_store)
    if whole:
        engine.int8_disabled_reason = reason
        if engine.drift_sampler is not None:
            engine.drift_sampler.drop_queued()
    else:
        engine.int8_layers_disabled_reason = reason
    log.warning("engine.int8_disabled", model=engine.model_id, reason=reason,
                blocks_dropped=dropped, pool_blocks=engine.pool.num_blocks,
                layers="all" if whole else sorted(full))
    return dropped
