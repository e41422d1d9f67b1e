"""Several replicas share one Redis; stores, lookups, rollouts, rollbacks, time and a replica
that loses every event interleave. After a rollout is acknowledged and the staleness bound has
passed, no replica returns an entry of an older epoch; in strict mode, none at all after the
acknowledgement."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from redis.asyncio import Redis

from cachesvc.store import decode_entry, encode_entry
from cachesvc.store.redis_store import RedisStore
from invalidation import EpochView, RedisRegistry, StaleViewError
from keying import Scope
from tests.store_helpers import KEYS, key_for, make_entry
from tests.support.clock import FakeClock
from tests.test_invalidation_events import DeafRegistry

pytestmark = pytest.mark.redis

BOUND = 2.0
MODELS = ["alpha", "beta"]
VERSIONS = ["v1", "v2", "v3"]
REPLICAS = 3  # replica 2 loses every event
SCOPE = Scope.for_tenant("acme")


def make_machine(host: str, port: int, strict: bool) -> type[RuleBasedStateMachine]:
    class ReplicasShareOneRedis(RuleBasedStateMachine):
        total_served = 0  # over every example of a run

        def __init__(self) -> None:
            super().__init__()
            redis.Redis(host=host, port=port).flushall()
            self.loop = asyncio.new_event_loop()
            self.client = Redis(host=host, port=port, socket_timeout=5)
            self.registry = RedisRegistry(self.client)
            self.store = RedisStore(self.client, owns_client=False)
            self.clock = FakeClock()
            self.views: list[EpochView] = []
            for i in range(REPLICAS):
                registry: Any = DeafRegistry(self.registry) if i == REPLICAS - 1 else self.registry
                self.views.append(
                    EpochView(registry, refresh_interval=BOUND, strict=strict, clock=self.clock)
                )
            # The plain model: every acknowledged rollout, as (clock at ack, epoch).
            self.acks: dict[str, list[tuple[float, int]]] = {m: [] for m in MODELS}
            for model in MODELS:
                self._rollout(model, "v1")
            for view in self.views:
                self.run(view.start())
                self.run(view.stop())  # the test drives each replica's loop by hand
            self.served = 0

        def run(self, coro: Any) -> Any:
            return self.loop.run_until_complete(coro)

        def teardown(self) -> None:
            type(self).total_served += self.served
            self.run(self.client.aclose())
            self.loop.close()

        def _rollout(self, model: str, version: str) -> None:
            r = self.run(self.registry.rollout(model, version))
            self.acks[model].append((self.clock.now, r.current.epoch))

        @rule(model=st.sampled_from(MODELS), version=st.sampled_from(VERSIONS))
        def rollout(self, model: str, version: str) -> None:
            self._rollout(model, version)

        @rule(seconds=st.sampled_from([0.1, 0.5, 0.9, 1.0, 1.5, 2.0, 3.0]))
        def time_passes(self, seconds: float) -> None:
            self.clock.now += seconds

        @rule(replica=st.integers(0, REPLICAS - 1))
        def replica_loop_runs(self, replica: int) -> None:
            self.run(self.views[replica].tick())

        @rule(replica=st.integers(0, REPLICAS - 1))
        def replica_reads_events_only(self, replica: int) -> None:
            self.run(self.views[replica].poll())

        @rule(replica=st.integers(0, REPLICAS - 1), model=st.sampled_from(MODELS),
              name=st.integers(0, 1))
        def replica_fills(self, replica: int, model: str, name: int) -> None:
            try:
                mv = self.views[replica].current(model)
            except StaleViewError:
                return  # fail closed: no fill from a view that may be stale
            entry = make_entry(scope=SCOPE, model=model, version=mv.version, epoch=mv.epoch,
                               name=name)
            self.run(self.store.set(key_for(entry), encode_entry(entry, keys=KEYS), ttl=600))

        @rule(replica=st.integers(0, REPLICAS - 1), model=st.sampled_from(MODELS),
              name=st.integers(0, 1))
        def replica_fills_then_looks_up(self, replica: int, model: str, name: int) -> None:
            """The common path, a miss filled and then hit, so hits are checked every run."""
            self.replica_fills(replica, model, name)
            self.replica_looks_up(replica, model, name)

        @rule(replica=st.integers(0, REPLICAS - 1), model=st.sampled_from(MODELS),
              name=st.integers(0, 1))
        def replica_looks_up(self, replica: int, model: str, name: int) -> None:
            view = self.views[replica]
            try:
                mv = view.current(model)
            except StaleViewError:
                return  # a miss
            # The key a fill from this view would have used (same request, this epoch).
            key = key_for(make_entry(scope=SCOPE, model=model, version=mv.version,
                                     epoch=mv.epoch, name=name))
            raw = self.run(self.store.get(key))
            if raw is None:
                return
            entry = decode_entry(raw, keys=KEYS)
            assert entry.epoch == mv.epoch and entry.model == model
            if strict and not self.run(view.is_current(model, entry.epoch)):
                return  # the strict check turned it into a miss
            self.served += 1
            now = self.clock.now
            if strict:
                assert entry.epoch == self.acks[model][-1][1], "strict mode served an old epoch"
            for acked_at, epoch in self.acks[model]:
                if now >= acked_at + BOUND:
                    assert entry.epoch >= epoch, (
                        f"replica {replica} served epoch {entry.epoch} at t={now}, "
                        f"{now - acked_at}s after epoch {epoch} was acknowledged"
                    )

        @invariant()
        def views_are_valid(self) -> None:
            for view in self.views:
                view.check_valid()
                for model, mv in view.snapshot().items():
                    assert mv.epoch <= self.acks[model][-1][1]

    return ReplicasShareOneRedis


@pytest.mark.parametrize("strict", [False, True], ids=["bounded", "strict"])
def test_no_replica_serves_an_old_epoch_past_the_bound(redis_standalone: Any, strict: bool) -> None:
    machine = make_machine(redis_standalone.host, redis_standalone.port, strict)
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        machine, settings=settings(max_examples=40, stateful_step_count=40, deadline=None)
    )
    assert machine.total_served > 0  # hits were checked, not only misses
