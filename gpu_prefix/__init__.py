"""gpu_prefix: the prefix KV store (chained block hashes, a paged KV pool, pins, eviction,
admission control, epochs), the transformers adapter, and the reference engine.

Imports only ``keying`` of this project.
"""

import importlib
from typing import Any

# NOTE: exports load lazily: importing ``gpu_prefix.errors`` or ``gpu_prefix.hashing`` must
# not pull in torch and transformers (seconds), e.g. for a service that proxies over HTTP.
_HOME = {
    "PoolCache": "attention", "StepLayout": "attention",
    "PoolPlan": "capacity", "pool_plan": "capacity",
    "Engine": "engine", "EngineStats": "engine",
    "GenerationParams": "params",
    "FinalEvent": "results", "GenerationResult": "results", "TokenEvent": "results",
    "AdmissionRefusedError": "errors", "InvalidParamsError": "errors", "ModelLoadError": "errors",
    "PoolExhaustedError": "errors", "PrefixCacheError": "errors",
    "PUBLIC_SALT": "hashing", "BlockKeys": "hashing", "block_hashes": "hashing",
    "scope_salt": "hashing",
    "MODEL_NAMES": "models", "LoadedModel": "models", "load_model": "models",
    "KVPool": "pool", "KVShape": "pool",
    "Lease": "store", "MatchResult": "store", "PrefixStore": "store", "StoreStats": "store",
    "Scheduler": "scheduler", "SchedulerConfig": "scheduler",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"gpu_prefix.{_HOME[name]}"), name)
    raise AttributeError(f"module 'gpu_prefix' has no attribute {name!r}")


__all__ = [
    "MODEL_NAMES",
    "PUBLIC_SALT",
    "AdmissionRefusedError",
    "BlockKeys",
    "Engine",
    "FinalEvent",
    "GenerationParams",
    "GenerationResult",
    "EngineStats",
    "InvalidParamsError",
    "KVPool",
    "KVShape",
    "Lease",
    "LoadedModel",
    "MatchResult",
    "ModelLoadError",
    "PoolExhaustedError",
    "PrefixCacheError",
    "PrefixStore",
    "PoolCache",
    "PoolPlan",
    "Scheduler",
    "SchedulerConfig",
    "StepLayout",
    "StoreStats",
    "TokenEvent",
    "block_hashes",
    "load_model",
    "pool_plan",
    "scope_salt",
]
