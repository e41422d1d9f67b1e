"""Values shared by the registry and the event stream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelVersion:
    """A model's current version and its epoch (``rolled_out_at``: wall-clock Unix seconds)."""

    model: str
    version: str
    epoch: int
    rolled_out_at: float = 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class RolloutEvent:
    """One rollout, as recorded in the event stream."""

    id: str
    model: str
    version: str
    epoch: int
    previous_epoch: int | None
    at: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Rollout:
    """What a rollout did. ``changed`` is False only for an idempotent repeat of the current
    version, which keeps the current epoch and emits no event."""

    current: ModelVersion
    previous: ModelVersion | None
    changed: bool
    event_id: str | None
