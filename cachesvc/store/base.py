"""The response-store contract and the storage-key layout.

Storage key::

    llmc:v1:<scope>:<model>:e<epoch>:<digest hex>

    <scope>  = p                          public
             | t/<tenant>                 tenant scope
             | u/<tenant>/<user>          user scope
    <tenant>, <user>, <model> = keying.escape_component(...)   ([A-Za-z0-9_.%~-] only)

Every component is escaped, so no tenant id, user id or model name can add a ``:``, a ``/``, a
hash tag (``{``/``}``) or a glob character (``*?[]\\``): a key always has exactly this structure
and a purge pattern built from escaped components matches only what it names. SCAN patterns are
only a prefilter; a key is deleted only after :func:`parse_storage_key` confirms every component.

NOTE: entry keys carry no hash tag on purpose. Every entry operation is single-key, so no
cross-slot command is ever needed, and without a tag a large tenant spreads over the whole
cluster instead of filling one node.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cachesvc.store.errors import EntryTooLargeError
from invalidation.purge import PurgeSelector
from keying import Scope, escape_component

PREFIX = "llmc:v1:"
ALL_ENTRIES_PATTERN = PREFIX + "*"

_KEY = re.compile(
    r"^llmc:v1:"
    r"(?P<scope>p|t/(?P<t>[A-Za-z0-9_.%~\-]+)|u/(?P<ut>[A-Za-z0-9_.%~\-]+)/(?P<uu>[A-Za-z0-9_.%~\-]+))"
    r":(?P<model>[A-Za-z0-9_.%~\-]+):e(?P<epoch>0|[1-9][0-9]*):(?P<digest>[0-9a-f]{32})$"
)


def check_set_args(value: object, ttl: float | None, max_entry_bytes: int) -> None:
    """The argument checks every store's ``set`` makes, so the stores refuse alike."""
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"value: expected bytes, got {type(value).__name__}")
    if ttl is not None and ttl <= 0:
        raise ValueError(f"ttl: {ttl!r} must be positive seconds or None")
    if len(value) > max_entry_bytes:
        raise EntryTooLargeError(
            f"entry of {len(value)} bytes exceeds max_entry_bytes={max_entry_bytes}; "
            "raise the limit or do not cache responses this large"
        )


def scope_component(scope: Scope) -> str:
    """The scope's part of a storage key."""
    if scope.kind == "public":
        return "p"
    if scope.kind == "tenant":
        return "t/" + escape_component(scope.tenant or "")
    return "u/" + escape_component(scope.tenant or "") + "/" + escape_component(scope.user or "")


def storage_key(*, scope: Scope, model: str, epoch: int, digest: bytes) -> str:
    """The key under which an entry with this scope, model, epoch and digest is stored."""
    if type(epoch) is not int or epoch < 0:  # bool is not int by type
        raise ValueError(f"epoch: {epoch!r} is not a non-negative integer")
    if len(digest) != 16:
        raise ValueError("digest: must be the 16-byte KeyResult.digest")
    return f"{_key_prefix(scope, model)}:e{epoch}:{digest.hex()}"


@functools.lru_cache(maxsize=4096)
def _key_prefix(scope: Scope, model: str) -> str:
    # Few (scope, model) pairs are live at a time; escaping them is most of a key's cost.
    return f"{PREFIX}{scope_component(scope)}:{escape_component(model)}"


@dataclass(frozen=True, kw_only=True, slots=True)
class StorageKeyParts:
    """A parsed storage key. Components stay escaped (escaping is injective, so equality of
    escaped components is equality of the originals)."""

    scope: str
    tenant: str | None
    user: str | None
    model: str
    epoch: int
    digest: bytes


def parse_storage_key(key: str | bytes) -> StorageKeyParts | None:
    """Parse a storage key, or None if the key is not exactly of our layout."""
    if isinstance(key, bytes):
        try:
            key = key.decode("ascii")
        except UnicodeDecodeError:
            return None
    m = _KEY.match(key)
    if m is None:
        return None
    return StorageKeyParts(
        scope=m["scope"],
        tenant=m["t"] or m["ut"],
        user=m["uu"],
        model=m["model"],
        epoch=int(m["epoch"]),
        digest=bytes.fromhex(m["digest"]),
    )


def selector_pattern(selector: PurgeSelector) -> str:
    """A SCAN MATCH prefilter for ``selector`` built from escaped components only."""
    scope = "[tu]/" + escape_component(selector.tenant) + "[:/]*" if selector.tenant else "*"
    if selector.model is None:
        return PREFIX + scope
    return f"{PREFIX}{scope}:{escape_component(selector.model)}:e*"


def key_matches(parts: StorageKeyParts, selector: PurgeSelector) -> bool:
    """Exact selector test on a parsed key (SCAN patterns are only a prefilter)."""
    if selector.tenant is not None and parts.tenant != escape_component(selector.tenant):
        return False
    if selector.model is not None and parts.model != escape_component(selector.model):
        return False
    if selector.before_epoch is not None and parts.epoch >= selector.before_epoch:  # noqa: SIM103
        return False
    return True


@runtime_checkable
class ResponseStore(Protocol):
    """One contract for the embedded store and Redis (standalone or Cluster).

    Values are opaque bytes (encoded envelopes); keys come from :func:`storage_key`. Every call
    returns or raises within the store's configured timeouts; a backend failure raises
    :class:`~cachesvc.store.errors.StoreUnavailableError`.
    """

    async def get(self, key: str) -> bytes | None:
        """The stored bytes, or None if absent or expired."""
        ...

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        """Store ``value``; it expires after ``ttl`` seconds (None: only evicted by memory)."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed."""
        ...

    async def claim(self, key: str, *, ttl: float) -> bool:
        """Mark ``key`` used for ``ttl`` seconds; True only for the first claim in that time
        (fill tokens are single-use). Claims live apart from entries: never evicted, scanned
        or purged as entries."""
        ...

    async def delete_tenant(self, tenant: str) -> int:
        """Remove every entry of ``tenant`` (tenant and user scopes); return the count."""
        ...

    async def delete_model(self, model: str, *, before_epoch: int | None = None) -> int:
        """Remove ``model``'s entries (only epochs below ``before_epoch`` if given)."""
        ...

    def scan_entries(self, *, batch: int = 500) -> AsyncIterator[tuple[str, bytes]]:
        """Every entry on every node, as ``(storage key, raw bytes)``, for offline audits."""
        ...

    async def purge_shards(self) -> Sequence[str]: ...

    async def purge_scan(
        self, shard: str, cursor: str, selector: PurgeSelector, count: int
    ) -> tuple[str | None, list[str], int]: ...

    async def purge_delete(self, shard: str, keys: Sequence[str]) -> int: ...

    async def purge_estimate(self, shard: str) -> int | None: ...

    async def close(self) -> None:
        """Release connections. The store is unusable afterwards."""
        ...


__all__ = [
    "ALL_ENTRIES_PATTERN",
    "PREFIX",
    "ResponseStore",
    "StorageKeyParts",
    "key_matches",
    "parse_storage_key",
    "scope_component",
    "selector_pattern",
    "storage_key",
]
