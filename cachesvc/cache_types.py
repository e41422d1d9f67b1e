"""The value types of the cache's request path: a request keyed for its tenant (``Keyed``),
where a fill goes (``FillTarget``), what an entry holds (``Payload``) and what a lookup found
(``LookupResult``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cachesvc.store.base import storage_key
from cachesvc.store.envelope import Entry
from cachesvc.streaming import body_to_chunks, chunks_to_body, replay
from cachesvc.tenants import Tenant
from keying import KeyResult, Scope

Status = Literal["hit", "miss", "bypass"]
@dataclass(frozen=True, kw_only=True, slots=True)
class FillTarget:
    """Where a fill goes and the provenance it is stored with."""

    scope: Scope
    digest: bytes
    material_digest: bytes
    model: str
    version: str
    epoch: int
    adapter: str | None
    ttl_seconds: int
    #: The key material, stored in the entry when the cache keeps it (``store_material``).
    material: bytes | None = None

    @property
    def storage_key(self) -> str:
        return storage_key(scope=self.scope, model=self.model, epoch=self.epoch,
                                digest=self.digest)


@dataclass(frozen=True, kw_only=True, slots=True)
class Keyed:
    """A request as this tenant sent it, with its key and the registry's view of its model."""

    tenant: Tenant
    scope: Scope
    body: dict[str, Any]
    kind: str
    key: KeyResult
    version: str
    epoch: int
    stream: bool
    include_usage: bool
    registry_ok: bool = True
    storage_key: str = ""

    @property
    def target(self) -> FillTarget:
        return FillTarget(scope=self.scope, digest=bytes(self.key.digest),
                          material_digest=bytes(self.key.material_digest), model=self.key.model,
                          version=self.version, epoch=self.epoch, adapter=self.key.adapter,
                          ttl_seconds=self.tenant.ttl_seconds, material=self.key.material)

    @property
    def flight_key(self) -> str:
        return self.storage_key


@dataclass(frozen=True, kw_only=True, slots=True)
class Payload:
    """What an entry holds: the upstream's body, or its stream chunks in order."""

    stream: bool
    body: dict[str, Any] | None = None
    chunks: list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, entry: Entry) -> Payload:
        if entry.stream is not None:
            return cls(stream=True, chunks=entry.stream)
        return cls(stream=False, body=entry.response)

    def as_body(self, kind: str) -> dict[str, Any]:
        return self.body if self.body is not None else chunks_to_body(self.chunks or [], kind)

    def as_chunks(self, kind: str, *, include_usage: bool) -> list[dict[str, Any]]:
        if self.chunks is not None:
            return replay(self.chunks, include_usage=include_usage)  # type: ignore[return-value]
        return body_to_chunks(self.body or {}, kind, include_usage=include_usage)


@dataclass(frozen=True, kw_only=True, slots=True)
class LookupResult:
    status: Status
    reason: str
    payload: Payload | None = None
    age: int | None = None
    raw: bytes = b""
    entry: Entry | None = None
