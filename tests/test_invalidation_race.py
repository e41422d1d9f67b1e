"""Fills that started before a rollout and finish after it never become visible under the new
epoch: on real Redis, with fills and the rollout racing in many interleavings."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from redis.asyncio import Redis

from cachesvc.store import decode_entry, encode_entry, storage_key
from cachesvc.store.redis_store import RedisStore
from invalidation import EpochView, RedisRegistry
from keying import Scope
from tests.store_helpers import digest_of, key_for, make_entry

pytestmark = pytest.mark.redis
SCOPE = Scope.for_tenant("acme")


@pytest.fixture
async def world(redis_standalone: Any) -> Any:
    client = Redis(host=redis_standalone.host, port=redis_standalone.port, socket_timeout=5)
    registry = RedisRegistry(client)
    store = RedisStore(client, owns_client=False)
    yield registry, store
    await client.aclose()


class TestFillRacesRollout:
    async def test_a_fill_finishing_after_a_rollout_is_invisible_under_the_new_epoch(
        self, world: Any
    ) -> None:
        registry, store = world
        await registry.rollout("m", "v1")
        view = EpochView(registry, refresh_interval=10)
        await view.start()
        try:
            old = view.current("m")  # the fill's lookup missed under this epoch
            new = (await registry.rollout("m", "v2")).current
            entry = make_entry(scope=SCOPE, model="m", version=old.version, epoch=old.epoch)
            await store.set(key_for(entry), encode_entry(entry), ttl=60)  # the late fill
            await view.poll()
            assert view.current("m") == new
            key_now = storage_key(scope=SCOPE, model="m", epoch=new.epoch, digest=entry.digest)
            assert await store.get(key_now) is None
        finally:
            await view.stop()

    async def test_racing_fills_and_rollouts_never_leak_across_epochs(self, world: Any) -> None:
        registry, store = world
        rng = random.Random(1234)
        await registry.rollout("m", "v0")
        view = EpochView(registry, refresh_interval=10, poll_interval=0.001)
        await view.start()
        leaks: list[str] = []
        connections = asyncio.Semaphore(50)  # the client's pool, not the test, is the limit

        async def fill(name: int) -> None:
            mv = view.current("m")  # epoch captured when the lookup missed
            await asyncio.sleep(rng.random() * 0.01)  # the model takes a while to answer
            entry = make_entry(scope=SCOPE, model="m", version=mv.version, epoch=mv.epoch,
                               name=name)
            async with connections:
                await store.set(key_for(entry), encode_entry(entry), ttl=60)

        async def lookup(name: int) -> None:
            mv = view.current("m")
            key = storage_key(scope=SCOPE, model="m", epoch=mv.epoch,
                              digest=digest_of(SCOPE, "m", name))
            async with connections:
                raw = await store.get(key)
            if raw is not None and decode_entry(raw).epoch != mv.epoch:
                leaks.append(key)

        async def rollouts() -> None:
            for i in range(20):
                await asyncio.sleep(rng.random() * 0.01)
                await registry.rollout("m", f"v{i % 3}")

        try:
            tasks = [fill(rng.randrange(5)) for _ in range(300)]
            tasks += [lookup(rng.randrange(5)) for _ in range(300)]
            rng.shuffle(tasks)
            await asyncio.gather(rollouts(), *tasks)
            await view.refresh()
            final = view.current("m")
            # Every stored entry sits under the epoch it was filled with, never a later one.
            async for key, raw in store.scan_entries():
                entry = decode_entry(raw)
                assert key == key_for(entry)
                assert entry.epoch <= final.epoch
            for name in range(5):
                await lookup(name)
            assert leaks == []
        finally:
            await view.stop()
