"""The model registry: every rollout, a rollback included, gets a fresh epoch, atomically with
its durable event; on the embedded registry, standalone Redis and Redis Cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from invalidation import (
    InvalidModelNameError,
    ModelRegistry,
    RedisRegistry,
    UnknownModelError,
)
from tests.invalidation_helpers import registry_for


@pytest.fixture(params=["embedded", "standalone", "cluster"])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[ModelRegistry]:
    async for reg in registry_for(request, request.param):
        yield reg


class TestModelRegistry:
    async def test_an_unknown_model_has_no_current_version(self, registry: ModelRegistry) -> None:
        assert await registry.get("m") is None
        with pytest.raises(UnknownModelError, match="models rollout m"):
            await registry.current("m")

    async def test_the_genesis_epoch_is_clock_based_stable_and_below_every_rollout(
        self, registry: ModelRegistry
    ) -> None:
        import time

        genesis = await registry.genesis()
        # Not a constant first epoch: at least the clock in milliseconds.
        assert genesis >= int(time.time() * 1000) - 60_000
        assert await registry.genesis() == genesis
        r = await registry.rollout("m", "v1")
        assert r.current.epoch > genesis and await registry.genesis() == genesis

    async def test_a_rollout_becomes_current(self, registry: ModelRegistry) -> None:
        r = await registry.rollout("m", "v1")
        assert r.changed and r.previous is None and r.event_id
        assert await registry.current("m") == r.current
        assert r.current.version == "v1" and r.current.epoch > 0

    async def test_every_rollout_gets_a_larger_epoch_even_a_rollback(
        self, registry: ModelRegistry
    ) -> None:
        epochs = []
        for version in ["v1", "v2", "v1", "v1", "v2"]:
            r = await registry.rollout("m", version)
            epochs.append(r.current.epoch)
        assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)

    async def test_an_idempotent_repeat_keeps_the_epoch_and_emits_nothing(
        self, registry: ModelRegistry
    ) -> None:
        first = await registry.rollout("m", "v1")
        last_event = await registry.events.last_id()
        again = await registry.rollout("m", "v1", idempotent=True)
        assert not again.changed and again.current == first.current and again.event_id is None
        assert await registry.events.last_id() == last_event

    async def test_an_idempotent_rollout_of_a_new_version_still_rolls_out(
        self, registry: ModelRegistry
    ) -> None:
        first = await registry.rollout("m", "v1", idempotent=True)
        second = await registry.rollout("m", "v2", idempotent=True)
        assert second.changed and second.current.epoch > first.current.epoch
        assert second.previous == first.current

    async def test_a_repeat_without_idempotent_is_a_new_epoch(
        self, registry: ModelRegistry) -> None:
        a = await registry.rollout("m", "v1")
        b = await registry.rollout("m", "v1")
        assert b.changed and b.current.epoch > a.current.epoch

    async def test_each_rollout_appends_one_event_in_order(self, registry: ModelRegistry) -> None:
        start = await registry.events.last_id()
        done = [await registry.rollout(m, v) for m, v in [("a", "1"), ("b", "1"), ("a", "2")]]
        events = await registry.events.read_after(start)
        assert [(e.model, e.version, e.epoch) for e in events] == [
            (r.current.model, r.current.version, r.current.epoch) for r in done
        ]
        assert [e.id for e in events] == [r.event_id for r in done]
        assert events[2].previous_epoch == done[0].current.epoch

    async def test_list_shows_every_model_sorted(self, registry: ModelRegistry) -> None:
        await registry.rollout("zeta", "1")
        await registry.rollout("alpha", "7")
        assert [(m.model, m.version) for m in await registry.list()] == [
            ("alpha", "7"), ("zeta", "1")
        ]

    async def test_hostile_model_names_and_versions_round_trip(
        self, registry: ModelRegistry
    ) -> None:
        model, version = 'm:{x}*"\\é/🙂', 'v"1\\/\u00e9'
        r = await registry.rollout(model, version)
        assert await registry.current(model) == r.current
        assert r.current.version == version

    @pytest.mark.parametrize(
        ("model", "version", "field"),
        [("", "v", "model"), ("m", "", "version"), ("m" * 300, "v", "model"),
         ("m", "v\n1", "version")],
    )
    async def test_bad_names_are_refused_naming_the_field(
        self, registry: ModelRegistry, model: str, version: str, field: str
    ) -> None:
        with pytest.raises(InvalidModelNameError, match=f"^{field}:"):
            await registry.rollout(model, version)


@pytest.mark.redis
class TestRedisRegistryDurability:
    async def test_a_lost_counter_cannot_reuse_an_epoch(self, redis_standalone) -> None:  # type: ignore[no-untyped-def]
        from redis.asyncio import Redis

        client = Redis(host=redis_standalone.host, port=redis_standalone.port)
        registry = RedisRegistry(client)
        first = await registry.rollout("m", "v1")
        await client.flushall()  # a Redis that restarted without persistence
        await asyncio.sleep(0.01)  # a restart takes longer than the clock's 1 ms resolution
        again = await registry.rollout("m", "v1")
        assert again.current.epoch > first.current.epoch
        await client.aclose()

    async def test_a_lost_registry_issues_a_new_larger_genesis(self, redis_standalone) -> None:  # type: ignore[no-untyped-def]
        """A model never rolled out is at the genesis epoch; after the registry's keys are
        lost, it is at a new one, so its entries from before the loss stay unreachable."""
        from redis.asyncio import Redis

        client = Redis(host=redis_standalone.host, port=redis_standalone.port)
        registry = RedisRegistry(client)
        first = await registry.genesis()
        rolled = await registry.rollout("m", "v1")
        await client.flushall()
        await asyncio.sleep(0.01)
        assert await registry.genesis() > rolled.current.epoch > first
        await client.aclose()

    async def test_registry_keys_share_one_hash_slot(self) -> None:
        from redis.crc import key_slot

        reg = RedisRegistry.__new__(RedisRegistry)
        RedisRegistry.__init__(reg, _FakeScriptClient(), namespace="a{b}:c")
        slots = {key_slot(k.encode()) for k in (reg.models_key, reg.counter_key, reg.events_key,
                                                 reg.genesis_key)}
        assert len(slots) == 1


class _FakeScriptClient:
    def register_script(self, script: str) -> object:
        return object()
