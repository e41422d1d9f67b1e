"""Each replica's EpochView: learns rollouts from durable events, re-reads the registry within
its bound even when events are lost, fails closed past the bound, and tells listeners."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from invalidation import (
    EmbeddedRegistry,
    EpochView,
    ModelRegistry,
    StaleViewError,
    UnknownModelError,
)
from invalidation.types import RolloutEvent
from tests.invalidation_helpers import registry_for
from tests.support.clock import FakeClock


class LosingEvents:
    """An event log that loses every event (a replica that misses them all)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def read_after(self, cursor: str, *, count: int = 100) -> list[RolloutEvent]:
        return []

    async def last_id(self) -> str:
        return await self._inner.last_id()

    async def first_id(self) -> str | None:
        return None


class DeafRegistry:
    """The same registry, seen through an event log that loses everything."""

    def __init__(self, inner: ModelRegistry) -> None:
        self._inner = inner
        self.events = LosingEvents(inner.events)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture(params=["embedded", "standalone", "cluster"])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[ModelRegistry]:
    async for reg in registry_for(request, request.param):
        yield reg


class TestEpochView:
    async def test_a_started_view_knows_every_model(self, registry: ModelRegistry) -> None:
        r = await registry.rollout("m", "v1")
        view = EpochView(registry, refresh_interval=5)
        await view.start()
        try:
            assert view.current("m") == r.current
            with pytest.raises(UnknownModelError, match="models rollout other"):
                view.current("other")
        finally:
            await view.stop()

    async def test_an_event_reaches_the_view_without_a_registry_read(
        self, registry: ModelRegistry
    ) -> None:
        clock = FakeClock(100.0)
        await registry.rollout("m", "v1")
        view = EpochView(registry, refresh_interval=10, clock=clock)
        await view.refresh()
        view._cursor = await registry.events.last_id()
        refreshes = view.refreshes
        r2 = await registry.rollout("m", "v2")
        assert await view.poll() == 1
        assert view.current("m") == r2.current and view.refreshes == refreshes

    async def test_a_view_that_loses_every_event_catches_up_by_the_bound(
        self, registry: ModelRegistry
    ) -> None:
        clock = FakeClock(100.0)
        await registry.rollout("m", "v1")
        view = EpochView(DeafRegistry(registry), refresh_interval=2.0, clock=clock)  # type: ignore[arg-type]
        await view.start()
        await view.stop()
        r2 = await registry.rollout("m", "v2")
        clock.now += 0.5
        await view.tick()  # no event arrives, no refresh due yet: still the old epoch
        assert view.current("m").epoch < r2.current.epoch
        clock.now += 0.6
        await view.tick()  # refresh_interval / 2 passed: the registry is re-read
        assert view.current("m") == r2.current

    async def test_a_view_past_its_bound_refuses_to_answer(self, registry: ModelRegistry) -> None:
        clock = FakeClock(100.0)
        await registry.rollout("m", "v1")
        view = EpochView(registry, refresh_interval=1.0, clock=clock)
        await view.refresh()
        clock.now += 0.999
        assert view.current("m").version == "v1"
        clock.now += 0.001
        with pytest.raises(StaleViewError, match=r"refresh_interval=1.0"):
            view.current("m")
        assert not await view.is_current("m", view.snapshot()["m"].epoch)
        await view.refresh()
        assert view.current("m").version == "v1"

    async def test_a_view_never_loaded_refuses_to_answer(self, registry: ModelRegistry) -> None:
        view = EpochView(registry)
        with pytest.raises(StaleViewError):
            view.current("m")

    async def test_strict_mode_sees_a_rollout_before_any_event_or_refresh(
        self, registry: ModelRegistry
    ) -> None:
        clock = FakeClock(100.0)
        r1 = await registry.rollout("m", "v1")
        view = EpochView(registry, refresh_interval=100, strict=True, clock=clock)
        await view.refresh()
        r2 = await registry.rollout("m", "v2")
        assert not await view.is_current("m", r1.current.epoch)
        assert await view.is_current("m", r2.current.epoch)

    async def test_listeners_hear_each_change_once_with_old_and_new_epochs(
        self, registry: ModelRegistry
    ) -> None:
        heard: list[tuple[str, int | None, int]] = []
        heard_async: list[int] = []

        async def async_listener(model: str, old: int | None, new: int) -> None:
            heard_async.append(new)

        def broken(model: str, old: int | None, new: int) -> None:
            raise RuntimeError("listener bug")

        view = EpochView(registry, refresh_interval=10)
        view.subscribe(broken)
        view.subscribe(lambda m, o, n: heard.append((m, o, n)))
        view.subscribe(async_listener)
        await view.start()
        await view.stop()
        r1 = await registry.rollout("m", "v1")
        r2 = await registry.rollout("m", "v1")
        await view.poll()
        await view.refresh()  # re-reading the same state is not a change
        assert heard == [("m", None, r1.current.epoch), ("m", r1.current.epoch, r2.current.epoch)]
        assert heard_async == [r1.current.epoch, r2.current.epoch]

    async def test_an_unsubscribed_listener_hears_nothing(self, registry: ModelRegistry) -> None:
        heard: list[int] = []
        view = EpochView(registry)
        unsubscribe = view.subscribe(lambda m, o, n: heard.append(n))
        unsubscribe()
        await registry.rollout("m", "v1")
        await view.refresh()
        assert heard == []

    async def test_a_restarted_replica_catches_up_from_its_persisted_cursor(
        self, registry: ModelRegistry
    ) -> None:
        await registry.rollout("m", "v1")
        before = EpochView(registry)
        await before.start()
        await before.stop()
        cursor = before.cursor
        missed = [await registry.rollout("m", v) for v in ("v2", "v3")]
        heard: list[int] = []
        after = EpochView(registry)
        after.subscribe(lambda m, o, n: heard.append(n))
        await after.start(from_cursor=cursor)
        await after.stop()
        assert heard == [r.current.epoch for r in missed]
        assert after.current("m") == missed[-1].current

    async def test_the_background_loop_applies_a_rollout_within_the_poll_interval(
        self, registry: ModelRegistry
    ) -> None:
        await registry.rollout("m", "v1")
        view = EpochView(registry, refresh_interval=30, poll_interval=0.02)
        await view.start()
        try:
            r2 = await registry.rollout("m", "v2")
            for _ in range(100):
                if view.current("m") == r2.current:
                    break
                await asyncio.sleep(0.02)
            assert view.current("m") == r2.current
            view.check_valid()
        finally:
            await view.stop()


class TestEpochViewTrimmedStream:
    async def test_a_cursor_older_than_the_kept_events_forces_a_registry_read(self) -> None:
        registry = EmbeddedRegistry()
        await registry.rollout("m", "v1")
        view = EpochView(registry)
        await view.start()
        await view.stop()
        await registry.rollout("m", "v2")
        del registry.events._events[:-1]  # the stream kept only the newest event
        refreshes = view.refreshes
        await view.poll()
        assert view.refreshes == refreshes + 1


class TestEpochViewStartsWithoutTheRegistry:
    async def test_a_view_started_in_the_background_answers_once_a_refresh_succeeds(self) -> None:
        registry = EmbeddedRegistry()
        r = await registry.rollout("m", "v1")
        view = EpochView(registry, refresh_interval=10, poll_interval=0.01)
        with pytest.raises(StaleViewError):
            view.current("m")
        view.start_background()
        try:
            for _ in range(200):
                if view.fresh():
                    break
                await asyncio.sleep(0.01)
            assert view.current("m") == r.current
        finally:
            await view.stop()
