"""invalidation: the model registry (model -> version -> epoch), rollout with durable events,
each replica's epoch view with a bounded staleness, and background purges.

Imports only ``keying`` of this project; the stores plug in through :class:`PurgeTarget`.
"""

from invalidation.errors import (
    CheckpointUnavailableError,
    InvalidationError,
    InvalidModelNameError,
    InvalidSelectorError,
    RegistryUnavailableError,
    StaleViewError,
    UnknownModelError,
)
from invalidation.events import EpochView, EventLog, MemoryEventLog, RedisEventLog
from invalidation.purge import (
    CheckpointStore,
    MemoryCheckpoints,
    PurgeProgress,
    Purger,
    PurgeReport,
    PurgeSelector,
    PurgeTarget,
    RedisCheckpoints,
    reclaim_on_rollout,
)
from invalidation.registry import EmbeddedRegistry, ModelRegistry, RedisRegistry
from invalidation.types import ModelVersion, Rollout, RolloutEvent

__all__ = [
    "CheckpointStore",
    "CheckpointUnavailableError",
    "EmbeddedRegistry",
    "EpochView",
    "EventLog",
    "InvalidModelNameError",
    "InvalidSelectorError",
    "InvalidationError",
    "MemoryCheckpoints",
    "MemoryEventLog",
    "ModelRegistry",
    "ModelVersion",
    "PurgeProgress",
    "PurgeReport",
    "PurgeSelector",
    "PurgeTarget",
    "Purger",
    "RedisCheckpoints",
    "RedisEventLog",
    "RedisRegistry",
    "RegistryUnavailableError",
    "Rollout",
    "RolloutEvent",
    "StaleViewError",
    "UnknownModelError",
    "reclaim_on_rollout",
]
