"""A fill that started before a rollout and finishes after it is never visible under the new
epoch, on real Redis. (That entries of one epoch never answer another is a property of the
storage key, shown over all inputs in tests/test_store_keys.py.)"""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from cachesvc.store import encode_entry, storage_key
from cachesvc.store.redis_store import RedisStore
from invalidation import EpochView, RedisRegistry
from keying import Scope
from tests.store_helpers import KEYS, key_for, make_entry

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
            await store.set(key_for(entry), encode_entry(entry, keys=KEYS), ttl=60)  # the late fill
            assert await store.get(key_for(entry)) is not None  # the late fill is stored...
            await view.poll()
            assert view.current("m") == new
            # ...but a lookup keyed with this view's epoch now (what the service does) misses it.
            key_now = storage_key(scope=SCOPE, model="m", epoch=view.current("m").epoch,
                                  digest=entry.digest)
            assert key_now != key_for(entry) and await store.get(key_now) is None
        finally:
            await view.stop()
