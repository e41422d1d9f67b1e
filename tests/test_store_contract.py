"""One contract, three stores: embedded, standalone Redis and a 3-node Redis Cluster.

Every test here runs against each store (real redis-server processes, never a fake).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from cachesvc.store import (
    EmbeddedStore,
    EntryTooLargeError,
    ResponseStore,
    decode_entry,
    encode_entry,
    open_store,
    storage_key,
)
from keying import Scope
from tests.store_helpers import KEYS, digest_of, key_for, make_entry
from tests.support.clock import FakeClock


@dataclass
class Harness:
    store: ResponseStore
    kind: str
    clock: FakeClock | None = None

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass: on the fake clock for the embedded store, really for Redis."""
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["embedded", "standalone", "cluster"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    kind = request.param
    if kind == "embedded":
        clock = FakeClock()
        h = Harness(EmbeddedStore(max_bytes=1 << 22, max_entry_bytes=1 << 20, clock=clock), kind,
                    clock)
    else:
        request.applymarker(pytest.mark.redis)
        fixture = "redis_url" if kind == "standalone" else "redis_cluster_url"
        url = request.getfixturevalue(fixture)
        h = Harness(open_store(url, max_entry_bytes=1 << 20, socket_timeout=2.0), kind)
    yield h
    await h.store.close()


def k(name: object, *, tenant: str = "acme", model: str = "m1", epoch: int = 1) -> str:
    return storage_key(
        scope=Scope.for_tenant(tenant), model=model, epoch=epoch, digest=digest_of(name)
    )


class TestStoreContract:
    async def test_a_missing_key_reads_as_none(self, harness: Harness) -> None:
        assert await harness.store.get(k("nothing")) is None

    async def test_stored_bytes_read_back_unchanged(self, harness: Harness) -> None:
        value = bytes(range(256)) * 7
        await harness.store.set(k("a"), value, ttl=60)
        assert await harness.store.get(k("a")) == value

    async def test_a_second_set_replaces_the_value(self, harness: Harness) -> None:
        await harness.store.set(k("a"), b"one", ttl=60)
        await harness.store.set(k("a"), b"two", ttl=60)
        assert await harness.store.get(k("a")) == b"two"

    async def test_delete_reports_whether_the_key_existed(self, harness: Harness) -> None:
        await harness.store.set(k("a"), b"x", ttl=60)
        assert await harness.store.delete(k("a")) is True
        assert await harness.store.delete(k("a")) is False
        assert await harness.store.get(k("a")) is None

    async def test_only_the_first_claim_of_a_key_succeeds_until_it_expires(
        self, harness: Harness
    ) -> None:
        assert await harness.store.claim("llmc:ft:a", ttl=0.3) is True
        assert await harness.store.claim("llmc:ft:a", ttl=0.3) is False
        assert await harness.store.claim("llmc:ft:b", ttl=60) is True
        assert [k async for k, _ in harness.store.scan_entries()] == []  # not an entry
        await harness.advance(0.4)
        assert await harness.store.claim("llmc:ft:a", ttl=60) is True
        assert await harness.store.claim("llmc:ft:b", ttl=60) is False

    async def test_an_entry_expires_after_its_ttl(self, harness: Harness) -> None:
        await harness.store.set(k("short"), b"x", ttl=0.3)
        await harness.store.set(k("long"), b"y", ttl=60)
        assert await harness.store.get(k("short")) == b"x"
        await harness.advance(0.6)
        assert await harness.store.get(k("short")) is None
        assert await harness.store.get(k("long")) == b"y"

    async def test_an_entry_without_ttl_stays(self, harness: Harness) -> None:
        await harness.store.set(k("forever"), b"x", ttl=None)
        await harness.advance(0.3)
        assert await harness.store.get(k("forever")) == b"x"

    async def test_an_entry_over_the_size_limit_is_refused(self, harness: Harness) -> None:
        with pytest.raises(EntryTooLargeError, match="max_entry_bytes"):
            await harness.store.set(k("big"), b"x" * ((1 << 20) + 1), ttl=60)
        assert await harness.store.get(k("big")) is None

    async def test_a_non_positive_ttl_is_refused(self, harness: Harness) -> None:
        with pytest.raises(ValueError, match="ttl"):
            await harness.store.set(k("a"), b"x", ttl=0)

    async def test_an_encoded_entry_round_trips(self, harness: Harness) -> None:
        entry = make_entry(stream=[{"choices": [{"delta": {"content": "hé"},
                                                 "finish_reason": "stop"}]}],
                           response=None)
        await harness.store.set(key_for(entry), encode_entry(entry, keys=KEYS), ttl=entry.ttl)
        raw = await harness.store.get(key_for(entry))
        assert raw is not None and decode_entry(raw, keys=KEYS) == entry

    async def test_delete_tenant_removes_its_tenant_and_user_entries_only(
        self, harness: Harness
    ) -> None:
        mine = [
            storage_key(scope=Scope.for_tenant("acme"), model="m", epoch=1, digest=digest_of(i))
            for i in range(30)
        ] + [
            storage_key(scope=Scope.for_user("acme", f"u{i}"), model="m", epoch=1,
                        digest=digest_of(i))
            for i in range(10)
        ]
        others = [
            storage_key(scope=Scope.for_tenant("acme2"), model="m", epoch=1, digest=digest_of(1)),
            storage_key(scope=Scope.for_user("acm", "e"), model="m", epoch=1, digest=digest_of(2)),
            storage_key(scope=Scope.public(), model="acme", epoch=1, digest=digest_of(3)),
        ]
        for key in mine + others:
            await harness.store.set(key, b"v", ttl=60)
        assert await harness.store.delete_tenant("acme") == len(mine)
        for key in mine:
            assert await harness.store.get(key) is None
        for key in others:
            assert await harness.store.get(key) == b"v"

    async def test_delete_model_before_an_epoch_keeps_newer_epochs(
        self, harness: Harness
    ) -> None:
        for epoch in (1, 2, 3):
            for i in range(10):
                await harness.store.set(k(i, epoch=epoch), b"v", ttl=60)
                await harness.store.set(k(i, epoch=epoch, model="other"), b"v", ttl=60)
        assert await harness.store.delete_model("m1", before_epoch=3) == 20
        assert all([await harness.store.get(k(i, epoch=3)) == b"v" for i in range(10)])
        assert all([await harness.store.get(k(i, epoch=1)) is None for i in range(10)])
        assert await harness.store.delete_model("m1") == 10
        assert all(
            [await harness.store.get(k(i, epoch=e, model="other")) == b"v"
             for i in range(10) for e in (1, 2, 3)]
        )

    async def test_scan_entries_yields_every_entry_once(self, harness: Harness) -> None:
        expected = {}
        for i in range(120):
            entry = make_entry(name=i, scope=Scope.for_tenant(f"t{i % 7}"))
            expected[key_for(entry)] = encode_entry(entry, keys=KEYS)
            await harness.store.set(key_for(entry), expected[key_for(entry)], ttl=60)
        seen: dict[str, bytes] = {}
        async for key, raw in harness.store.scan_entries(batch=17):
            assert key not in seen
            seen[key] = raw
        assert seen == expected

    async def test_every_store_implements_the_protocol(self, harness: Harness) -> None:
        assert isinstance(harness.store, ResponseStore)
