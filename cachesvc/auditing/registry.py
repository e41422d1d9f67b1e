"""The model registry as the auditor reads it: from the worker thread, and for a scan."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from audit import ModelState
from audit.protocols import FreshVersions, RegistryReader


class LoopRegistryView:
    """A synchronous view of the service's asyncio registry, for the auditor's worker thread.

    ``versions.current(model, fresh=True)`` runs on the service's event loop, where its
    clients live. ``fresh``: read the registry itself, not the replica's cached view: a replica
    that missed a rollout must not be judged by its own view.
    """

    def __init__(self, versions: FreshVersions, loop: asyncio.AbstractEventLoop, *,
                 timeout: float = 2.0, cache_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._versions = versions
        self._loop = loop
        self._timeout = timeout
        # NOTE: answers are kept for ``cache_s`` (far below the auditor's staleness grace), so a
        # busy auditor does not queue a registry read on the service's loop for every sample.
        self._cache_s = cache_s
        self._clock = clock
        self._cached: dict[str, tuple[float, ModelState]] = {}

    def current(self, model: str) -> ModelState | None:
        now = self._clock()
        hit = self._cached.get(model)
        if hit is not None and now - hit[0] < self._cache_s:
            return hit[1]
        fut = asyncio.run_coroutine_threadsafe(self._versions.current(model, fresh=True),
                                               self._loop)
        version, epoch = fut.result(self._timeout)
        state = ModelState(model=model, version=version, epoch=epoch)
        self._cached[model] = (now, state)
        return state


async def registry_snapshot(registry: RegistryReader) -> dict[str, ModelState]:
    """Every model the registry knows, as :class:`ModelState` by model."""
    return {m.model: ModelState(model=m.model, version=m.version, epoch=m.epoch)
            for m in await registry.list()}
