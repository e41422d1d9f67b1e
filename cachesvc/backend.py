"""The response store as the service calls it: get, put and purge raw envelopes by scope+digest.

NOTE: a thin seam over ``cachesvc.store`` so the request path depends on four calls only.
"""

from __future__ import annotations

from typing import Protocol

from keying import Scope


class StoreBackend(Protocol):
    async def get(self, scope: Scope, digest: bytes) -> bytes | None: ...

    async def put(self, scope: Scope, digest: bytes, raw: bytes, ttl_s: float) -> None: ...

    async def purge_tenant(self, tenant: str) -> int: ...

    async def aclose(self) -> None: ...


class MemoryBackend:
    """Temporary in-process backend (replaced by the embedded store adapter)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, bytes], bytes] = {}

    async def get(self, scope: Scope, digest: bytes) -> bytes | None:
        return self.data.get((scope.label, bytes(digest)))

    async def put(self, scope: Scope, digest: bytes, raw: bytes, ttl_s: float) -> None:
        self.data[(scope.label, bytes(digest))] = raw

    async def purge_tenant(self, tenant: str) -> int:
        doomed = [k for k in self.data if k[0].startswith((f"tenant:{tenant}", f"user:{tenant}/"))]
        for k in doomed:
            del self.data[k]
        return len(doomed)

    async def aclose(self) -> None:
        return None
