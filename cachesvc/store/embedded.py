"""The embedded response store: in-process, bounded by bytes, least recently used out first,
entries expire after their TTL. The default when no Redis is configured."""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from cachesvc.store.base import (
    PREFIX,
    check_set_args,
    key_matches,
    parse_storage_key,
)
from cachesvc.store.errors import StoreConfigError
from invalidation.purge import Purger, PurgeSelector

SHARD = "embedded"
#: Bytes charged per entry on top of key and value (dict slot, tuple, bookkeeping).
ENTRY_OVERHEAD = 96


@dataclass(slots=True)
class _Item:
    value: bytes
    expires_at: float | None
    size: int


class EmbeddedStore:
    """In-process store. ``clock`` is monotonic seconds (injected for tests)."""

    def __init__(
        self,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        max_entry_bytes: int = 8 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0:
            raise StoreConfigError(f"max_bytes: {max_bytes} must be positive")
        if max_entry_bytes <= 0:
            raise StoreConfigError(f"max_entry_bytes: {max_entry_bytes} must be positive")
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._clock = clock
        self._items: OrderedDict[str, _Item] = OrderedDict()
        self._bytes = 0
        self._closed = False
        self._snapshots: dict[str, list[str]] = {}
        self._snapshot_ids = itertools.count(1)
        self.evictions = 0
        #: claim key -> expiry; apart from the entries, so memory pressure cannot evict one.
        self._claims: dict[str, float] = {}

    # -- the contract -------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item.expires_at is not None and self._clock() >= item.expires_at:
            self._remove(key)
            return None
        self._items.move_to_end(key)
        return item.value

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        check_set_args(value, ttl, self.max_entry_bytes)
        size = len(key) + len(value) + ENTRY_OVERHEAD
        if key in self._items:
            self._remove(key)
        expires_at = None if ttl is None else self._clock() + ttl
        self._items[key] = _Item(bytes(value), expires_at, size)
        self._bytes += size
        self._evict()

    async def delete(self, key: str) -> bool:
        if key in self._items:
            self._remove(key)
            return True
        return False

    async def claim(self, key: str, *, ttl: float) -> bool:
        now = self._clock()
        if len(self._claims) >= 1024:  # amortised: drop the expired ones now and then
            self._claims = {k: t for k, t in self._claims.items() if t > now}
        if self._claims.get(key, now) > now:
            return False
        self._claims[key] = now + ttl
        return True

    async def delete_tenant(self, tenant: str) -> int:
        return (await Purger(self).run(PurgeSelector(tenant=tenant))).deleted

    async def delete_model(self, model: str, *, before_epoch: int | None = None) -> int:
        selector = PurgeSelector(model=model, before_epoch=before_epoch)
        return (await Purger(self).run(selector)).deleted

    async def scan_entries(self, *, batch: int = 500) -> AsyncIterator[tuple[str, bytes]]:
        now = self._clock()
        for key in list(self._items):
            item = self._items.get(key)
            if item is None or not key.startswith(PREFIX):
                continue
            if item.expires_at is not None and now >= item.expires_at:
                continue
            yield key, item.value

    async def close(self) -> None:
        self._items.clear()
        self._bytes = 0
        self._closed = True

    # -- purge target -------------------------------------------------------------------------

    async def purge_shards(self) -> Sequence[str]:
        return [SHARD]

    async def purge_scan(
        self, shard: str, cursor: str, selector: PurgeSelector, count: int
    ) -> tuple[str | None, list[str], int]:
        # NOTE: a snapshot of the key list stands in for Redis' SCAN cursor. An unknown snapshot
        # (the process restarted) starts over: the store restarted empty, so nothing is missed.
        snap_id, _, pos_s = cursor.partition(":")
        keys = self._snapshots.get(snap_id)
        pos = int(pos_s) if pos_s.isdigit() else 0
        if keys is None:
            snap_id = str(next(self._snapshot_ids))
            keys = self._snapshots[snap_id] = list(self._items)
            pos = 0
        chunk = keys[pos : pos + count]
        found = []
        for key in chunk:
            parts = parse_storage_key(key)
            if parts is not None and key in self._items and key_matches(parts, selector):
                found.append(key)
        pos += len(chunk)
        if pos >= len(keys):
            del self._snapshots[snap_id]
            return None, found, len(chunk)
        return f"{snap_id}:{pos}", found, len(chunk)

    async def purge_delete(self, shard: str, keys: Sequence[str]) -> int:
        return sum([await self.delete(k) for k in keys])

    async def purge_estimate(self, shard: str) -> int | None:
        return len(self._items)

    # -- bookkeeping --------------------------------------------------------------------------

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def _remove(self, key: str) -> None:
        item = self._items.pop(key)
        self._bytes -= item.size

    def _evict(self) -> None:
        # NOTE: plain LRU; expired entries are dropped lazily on read or by sweep_expired(), so a
        # set at capacity stays O(1) instead of scanning every entry for expired ones.
        while self._bytes > self.max_bytes:
            key = next(iter(self._items))
            self._remove(key)
            self.evictions += 1

    def sweep_expired(self) -> int:
        """Drop every expired entry now (call periodically); return how many."""
        now = self._clock()
        expired = [k for k, it in self._items.items()
                   if it.expires_at is not None and now >= it.expires_at]
        for key in expired:
            self._remove(key)
        return len(expired)

    def check_valid(self) -> None:
        """Assert byte accounting and the memory bound."""
        total = sum(it.size for it in self._items.values())
        assert total == self._bytes, (total, self._bytes)
        assert self._bytes <= self.max_bytes, (self._bytes, self.max_bytes)
        for key, it in self._items.items():
            assert it.size == len(key) + len(it.value) + ENTRY_OVERHEAD
            assert len(it.value) <= self.max_entry_bytes


__all__ = ["EmbeddedStore"]
