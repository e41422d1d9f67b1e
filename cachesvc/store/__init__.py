"""Response storage: the entry envelope, the store contract, the embedded and Redis stores.

``open_store(url)`` picks the store: no URL gives the embedded in-process store; ``redis://``,
``rediss://`` or ``unix://`` a standalone Redis; ``redis+cluster://host:port[,host:port...]``
(or ``nodes=[...]``) a Redis Cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from cachesvc.store.base import (
    PREFIX,
    ResponseStore,
    StorageKeyParts,
    parse_storage_key,
    scope_component,
    storage_key,
)
from cachesvc.store.embedded import EmbeddedStore
from cachesvc.store.envelope import Entry, decode_entry, encode_entry
from cachesvc.store.errors import (
    CorruptEntryError,
    EntryDecodeError,
    EntryTooLargeError,
    ForeignEntryError,
    ForgedEntryError,
    InvalidEntryError,
    OversizeEntryError,
    StoreConfigError,
    StoreError,
    StoreUnavailableError,
    UnknownKeyError,
    UnsupportedVersionError,
)
from cachesvc.store.mac import EntryKeys
from cachesvc.store.targets import redis_target


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreLimits:
    """Bounds every store honours. Timeouts are seconds."""

    #: Embedded store: total bytes (keys, values and per-entry overhead).
    max_bytes: int = 256 * 1024 * 1024
    #: Largest encoded entry accepted by ``set``.
    max_entry_bytes: int = 8 * 1024 * 1024
    #: Redis: per-command socket timeout (a slow Redis becomes a miss after this).
    socket_timeout: float = 0.25
    #: Redis: connect timeout.
    connect_timeout: float = 0.5
    #: Redis: retries of a failed command on a fresh connection (0 = fail at once).
    retries: int = 1
    #: Redis: connection-pool size (per node for a cluster).
    max_connections: int = 256
    #: Embedded store clock (monotonic seconds).
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_entry_bytes", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise StoreConfigError(f"{name}: {value!r} must be a positive integer")
        for name in ("socket_timeout", "connect_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise StoreConfigError(
                    f"{name}: {value!r} must be a positive number of seconds (a store call must "
                    "never wait without bound)"
                )
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise StoreConfigError(f"retries: {self.retries!r} must be a non-negative integer")


def _limits(kwargs: dict[str, Any]) -> StoreLimits:
    known = {f.name for f in fields(StoreLimits)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise StoreConfigError(
            f"unknown store limit(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return StoreLimits(**kwargs)


def open_store(
    url: str | None = None,
    *,
    nodes: Sequence[str | tuple[str, int]] | None = None,
    **limits: Any,
) -> ResponseStore:
    """Open the store named by ``url`` (or the cluster named by ``nodes``) with ``limits``
    (fields of :class:`StoreLimits`)."""
    lim = _limits(limits)
    target = redis_target(url, nodes)
    if target is None:
        return EmbeddedStore(
            max_bytes=lim.max_bytes, max_entry_bytes=lim.max_entry_bytes, clock=lim.clock
        )
    from cachesvc.store.pipelined_get import PipelinedGet
    from cachesvc.store.redis_client import redis_client
    from cachesvc.store.redis_store import RedisStore

    client = redis_client(target, flavour="async", socket_timeout=lim.socket_timeout,
                          connect_timeout=lim.connect_timeout, retries=lim.retries,
                          # NOTE: a plain (non-blocking) pool: past max_connections a call
                          # fails at once and the service treats it as a miss. A blocking pool
                          # would queue instead, and its lock costs a measurable share of a
                          # small GET (bench/store.py); a cache should shed load, not queue it.
                          max_connections=lim.max_connections)
    if target.cluster:
        return RedisStore(client, max_entry_bytes=lim.max_entry_bytes)
    return RedisStore(client, max_entry_bytes=lim.max_entry_bytes,
                      getter=PipelinedGet.for_client(client,
                                                     connect_timeout=lim.connect_timeout))


__all__ = [
    "PREFIX",
    "CorruptEntryError",
    "EmbeddedStore",
    "Entry",
    "EntryDecodeError",
    "EntryTooLargeError",
    "EntryKeys",
    "ForeignEntryError",
    "ForgedEntryError",
    "InvalidEntryError",
    "OversizeEntryError",
    "ResponseStore",
    "StorageKeyParts",
    "StoreConfigError",
    "StoreError",
    "StoreLimits",
    "StoreUnavailableError",
    "UnknownKeyError",
    "UnsupportedVersionError",
    "decode_entry",
    "encode_entry",
    "open_store",
    "parse_storage_key",
    "scope_component",
    "storage_key",
]
