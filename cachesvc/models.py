"""The model registry as the request path sees it: ``model -> (version, epoch)``, rollouts.

Reads come from this replica's :class:`invalidation.EpochView` (no round trip per request); it
follows the durable rollout events and re-reads the registry at least every
``[cache] registry_refresh_s`` seconds. Past that bound without a confirmed read (the registry
is down), :meth:`ModelVersions.current` raises :class:`RegistryUnavailable` and the request
bypasses the cache: better no cache than a possibly stale one.

A model that was never rolled out has version ``"unversioned"`` and the registry's genesis
epoch (clock-based, issued once; a registry that lost its keys issues a larger one): its
entries become unreachable at its first rollout, like any other epoch change, and no epoch is
ever handed out twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import structlog

from cachesvc.errors import BadRequestError, NotFoundError, ServiceError
from cachesvc.store.base import ResponseStore
from invalidation import (
    EmbeddedRegistry,
    EpochView,
    InvalidationError,
    InvalidModelNameError,
    ModelRegistry,
    ModelVersion,
    StaleViewError,
    UnknownModelError,
)

log = structlog.get_logger()

UNVERSIONED = "unversioned"


class RegistryUnavailable(ServiceError, ConnectionError):
    """Raised when this replica cannot vouch for a model's epoch (registry unreachable for
    longer than the refresh bound). The request bypasses the cache."""

    status = 503
    code = "registry_unavailable"


class ModelVersions:
    def __init__(self, registry: ModelRegistry, view: EpochView) -> None:
        self.registry = registry
        self.view = view

    @classmethod
    async def open(cls, registry: ModelRegistry, *, refresh_s: float, strict: bool,
                   poll_s: float = 0.1) -> ModelVersions:
        view = EpochView(registry, refresh_interval=refresh_s,
                         poll_interval=min(poll_s, refresh_s / 4), strict=strict)
        try:
            await view.start()
        except InvalidationError as exc:
            # A registry that is down at start-up must not stop the service: the view keeps
            # retrying in the background, and until then every request bypasses the cache.
            log.warning("registry_unavailable_at_start", error=str(exc)[:200])
            view.start_background()
        return cls(registry, view)

    async def current(self, model: str, *, fresh: bool = False) -> tuple[str, int]:
        """The model's version and epoch from this replica's view, or with ``fresh`` from one
        registry read (the auditor must not judge a replica by the view it is checking). An
        unregistered model is at the genesis epoch."""
        if fresh:
            try:
                mv = await self.registry.get(model)
                return ((UNVERSIONED, await self.registry.genesis()) if mv is None
                        else (mv.version, mv.epoch))
            except InvalidationError as exc:
                raise RegistryUnavailable(f"registry read failed: {exc}") from None
        try:
            mv = self.view.current(model)
        except UnknownModelError:
            assert self.view.genesis is not None  # a fresh view has read it
            return UNVERSIONED, self.view.genesis
        except StaleViewError as exc:
            raise RegistryUnavailable(str(exc)) from None
        return mv.version, mv.epoch

    async def is_current(self, model: str, epoch: int) -> bool:
        """Strict check of one entry's epoch: one registry read. An unreachable registry fails
        closed (a miss)."""
        try:
            return epoch == (await self.current(model, fresh=True))[1]
        except RegistryUnavailable:
            return False

    async def rollout(self, model: str, version: str, *, idempotent: bool = False,
                      create: bool = False) -> tuple[str, int]:
        """Roll ``model`` out at ``version`` (``idempotent``: the same version again keeps its
        epoch) and apply it on this replica at once; the others learn it from the events.
        A model the registry does not know is refused unless ``create`` (a typo must not
        start a model of its own)."""
        try:
            result = await self.registry.rollout(model, version, idempotent=idempotent,
                                                 only=None if create else "existing")
        except UnknownModelError as exc:
            raise NotFoundError(str(exc), field="model",
                                fix="check the model name; to start a new model, roll it out "
                                    "with create") from None
        except InvalidModelNameError as exc:
            raise BadRequestError(str(exc), field=exc.field,
                                  fix="use printable names without control characters") from None
        except InvalidationError as exc:
            raise RegistryUnavailable(f"rollout failed: {exc}") from None
        await self._apply_now()
        return result.current.version, result.current.epoch

    async def adopt(self, model: str, version: str) -> tuple[str, int]:
        """Start-up: register ``model`` at ``version`` if the registry has never seen it, and
        never change a model it has. Returns the registry's (version, epoch); a version other
        than ``version`` means this process serves weights the registry does not name."""
        try:
            result = await self.registry.rollout(model, version, only="absent")
        except InvalidationError as exc:
            raise RegistryUnavailable(f"registry read failed: {exc}") from None
        await self._apply_now()
        return result.current.version, result.current.epoch

    async def genesis(self) -> int:
        """The registry's epoch for models it has no rollout of (what the scan judges their
        entries by), from one registry read."""
        try:
            return await self.registry.genesis()
        except InvalidationError as exc:
            raise RegistryUnavailable(f"registry read failed: {exc}") from None

    async def _apply_now(self) -> None:
        try:
            # Apply at once on this replica; the others learn it from the event stream.
            await self.view.poll()
        except InvalidationError:
            pass

    async def list(self) -> list[ModelVersion]:
        """Every model the registry knows, from one registry read."""
        try:
            return await self.registry.list()
        except InvalidationError as exc:
            raise RegistryUnavailable(f"registry unavailable: {exc}") from None

    def subscribe(self, listener: Callable[[str, int | None, int], Any]) -> Callable[[], None]:
        return self.view.subscribe(listener)

    async def aclose(self) -> None:
        await self.view.stop()


async def open_versions(store: ResponseStore, *, refresh_s: float, strict: bool
                        ) -> ModelVersions:
    """The registry beside the store: in Redis when the store is Redis, else in process."""
    # NOTE: a RedisStore exists only once its module is loaded; importing it here would load
    # redis-py into a service on the embedded store.
    redis_store = sys.modules.get("cachesvc.store.redis_store")
    if redis_store is not None and isinstance(store, redis_store.RedisStore):
        from invalidation import RedisRegistry

        registry: ModelRegistry = RedisRegistry(store.client)
    else:
        registry = EmbeddedRegistry()
    return await ModelVersions.open(registry, refresh_s=refresh_s, strict=strict)
