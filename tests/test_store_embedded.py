"""The embedded store: bounded by bytes, least recently used out first, TTL on an injected
clock; checked against a plain model by a stateful test."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cachesvc.store import EmbeddedStore, StoreConfigError, open_store
from cachesvc.store.embedded import ENTRY_OVERHEAD
from tests.support.clock import FakeClock


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


class TestEmbeddedStore:
    async def test_the_least_recently_used_entry_goes_first(self) -> None:
        size = 10 + 100 + ENTRY_OVERHEAD
        store = EmbeddedStore(max_bytes=3 * size, max_entry_bytes=1000)
        for name in ("key-000001", "key-000002", "key-000003"):
            await store.set(name, b"x" * 100)
        await store.get("key-000001")  # now the most recent
        await store.set("key-000004", b"x" * 100)
        assert await store.get("key-000002") is None
        assert await store.get("key-000001") is not None
        assert store.evictions == 1
        store.check_valid()

    async def test_memory_never_exceeds_the_bound(self) -> None:
        store = EmbeddedStore(max_bytes=10_000, max_entry_bytes=5_000)
        for i in range(500):
            await store.set(f"k{i}", b"v" * (i % 50 * 10))
            assert store.bytes_used <= 10_000
        store.check_valid()

    async def test_sweep_removes_expired_entries_only(self) -> None:
        clock = FakeClock(0.0)
        store = EmbeddedStore(clock=clock)
        await store.set("a", b"1", ttl=1)
        await store.set("b", b"2", ttl=10)
        clock.now = 5
        assert store.sweep_expired() == 1 and len(store) == 1
        assert await store.get("b") == b"2"

    def test_open_store_without_a_url_is_embedded(self) -> None:
        assert isinstance(open_store(None, max_bytes=1 << 20), EmbeddedStore)

    @pytest.mark.parametrize(
        ("url", "limits", "match"),
        [("http://x", {}, "redis.url: scheme 'http'"), (None, {"max_bytes": 0}, "max_bytes"),
         ("redis://x", {"socket_timeout": 0}, "socket_timeout"),
         (None, {"max_byte": 1}, "unknown store limit"),
         ("redis+cluster://", {}, "needs host:port")],
    )
    def test_bad_settings_are_refused_naming_the_setting(self, url, limits, match) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(StoreConfigError, match=match):
            open_store(url, **limits)


class EmbeddedAgainstModel(RuleBasedStateMachine):
    MAX = 2_000

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(0.0)
        self.store = EmbeddedStore(max_bytes=self.MAX, max_entry_bytes=600, clock=self.clock)
        # The model: key -> (value, expires_at), in LRU order, and its byte count.
        self.model: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()

    def _size(self, key: str, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD

    @rule(key=st.sampled_from([f"k{i}" for i in range(8)]), n=st.integers(0, 600),
          ttl=st.none() | st.sampled_from([1.0, 5.0]))
    def set(self, key: str, n: int, ttl: float | None) -> None:
        value = bytes([n % 256]) * n
        run(self.store.set(key, value, ttl=ttl))
        self.model.pop(key, None)
        self.model[key] = (value, None if ttl is None else self.clock.now + ttl)
        while sum(self._size(k, v) for k, (v, _) in self.model.items()) > self.MAX:
            self.model.popitem(last=False)

    @rule(key=st.sampled_from([f"k{i}" for i in range(8)]))
    def get(self, key: str) -> None:
        got = run(self.store.get(key))
        item = self.model.get(key)
        if item is not None and item[1] is not None and self.clock.now >= item[1]:
            del self.model[key]
            item = None
        if item is not None:
            self.model.move_to_end(key)
        assert got == (None if item is None else item[0])

    @rule(key=st.sampled_from([f"k{i}" for i in range(8)]))
    def delete(self, key: str) -> None:
        existed = run(self.store.delete(key))
        assert existed == (key in self.model)
        self.model.pop(key, None)

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def valid(self) -> None:
        self.store.check_valid()
        assert list(self.store._items) == list(self.model)


TestEmbeddedAgainstModel = EmbeddedAgainstModel.TestCase
TestEmbeddedAgainstModel.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
