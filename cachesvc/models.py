"""The registry as the request path sees it: model -> (version, epoch), rollouts, a listing."""

from __future__ import annotations

from typing import Any


class MemoryVersions:
    """Temporary in-process registry view (replaced by the invalidation adapter)."""

    def __init__(self) -> None:
        self._m: dict[str, tuple[str, int]] = {}
        self._next = 1

    async def current(self, model: str, *, fresh: bool = False) -> tuple[str, int]:
        return self._m.get(model, ("unversioned", 0))

    async def rollout(self, model: str, version: str) -> tuple[str, int]:
        epoch = self._next
        self._next += 1
        self._m[model] = (version, epoch)
        return version, epoch

    async def list(self) -> list[dict[str, Any]]:
        return [{"model": m, "version": v, "epoch": e} for m, (v, e) in sorted(self._m.items())]

    async def aclose(self) -> None:
        return None
