"""Errors raised by ``invalidation``: one base, each also the matching built-in."""

from __future__ import annotations


class InvalidationError(Exception):
    """Base of every error raised by ``invalidation``."""


class InvalidModelNameError(InvalidationError, ValueError):
    """Raised when a model name or version is empty, too long, or not a string.

    ``field`` names the offending argument; the message says what is accepted.
    """

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}; {fix}")


class UnknownModelError(InvalidationError, LookupError):
    """Raised when a model has never been rolled out, so it has no version or epoch yet.
    Fix: ``cachesvc models rollout MODEL VERSION``."""


class StaleViewError(InvalidationError, RuntimeError):
    """Raised by an :class:`~invalidation.events.EpochView` asked for an epoch when it has not
    confirmed the registry within its staleness bound (Redis unreachable, loop stalled).

    Callers treat it as a miss: serving from a view that may be stale is never allowed.
    """


class InvalidSelectorError(InvalidationError, ValueError):
    """Raised when a purge names no model and no tenant, or ``before_epoch`` without a model."""


class RegistryUnavailableError(InvalidationError, ConnectionError):
    """Raised when the registry's Redis cannot be reached or does not answer in time."""


class CheckpointUnavailableError(InvalidationError, ConnectionError):
    """Raised when a purge cannot read or write its checkpoint (its Redis is unreachable).
    The purge stops; run it again to resume from the last checkpoint that was written."""
