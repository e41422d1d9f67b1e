"""Exact memo tables for the hit path: results of pure functions, keyed by their exact input.

The key builder and the envelope decoder are pure: the same bytes always give the same key and
the same verified entry. Hit-heavy traffic repeats identical bytes, so the service remembers
recent results keyed by the *bytes themselves* (a dict compares keys for equality after the
hash, so there is no collision to exploit: different bytes never share a result). Nothing here
decides presence or freshness; the store is still asked on every request.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class Memo(Generic[V]):
    """A bounded LRU map, bounded by item count and by the summed ``size`` of its keys."""

    def __init__(self, *, max_items: int = 4096, max_bytes: int = 32 * 1024 * 1024) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("max_items and max_bytes must be positive")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        if size > self.max_bytes // 8:
            return  # one huge item would flush everything else
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._items[key] = (value, size)
        self._bytes += size
        while len(self._items) > self.max_items or self._bytes > self.max_bytes:
            _, (_, s) = self._items.popitem(last=False)
            self._bytes -= s

    def __len__(self) -> int:
        return len(self._items)

    def check_valid(self) -> None:
        assert self._bytes == sum(s for _, s in self._items.values())
        assert len(self._items) <= self.max_items and self._bytes <= self.max_bytes
