"""Purges: old epochs of a model, one tenant (with hostile ids), everything for a model; on
every node of a real 3-node cluster, with progress, a final count, and resumable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cachesvc.store import open_store, storage_key
from cachesvc.store.redis_store import RedisStore
from invalidation import InvalidSelectorError, PurgeProgress, Purger, PurgeSelector
from keying import Scope
from tests.store_helpers import digest_of

HOSTILE_TENANTS = [
    "*",
    ":",
    "{",
    "}",
    "a*",
    "a:b",
    "{a}",
    "a}b{",
    "[ab]",
    "?",
    "\\",
    "t/x",
    "%2A",
    "~deadbeef",
    "x" * 500,
    "x" * 499,
    "日本語テナント",
    "é",
    "e\u0301",
    "a b",
    "acme",
    "acme:1",
    "acm",
]


def _key(tenant: str, i: int, *, model: str = "m", epoch: int = 1, user: str | None = None) -> str:
    scope = Scope.for_user(tenant, user) if user else Scope.for_tenant(tenant)
    return storage_key(scope=scope, model=model, epoch=epoch, digest=digest_of(tenant, user, i))


@pytest.fixture
async def cluster_store(redis_cluster: Any) -> AsyncIterator[RedisStore]:
    store = open_store(redis_cluster.url, socket_timeout=2.0)
    assert isinstance(store, RedisStore)
    yield store
    await store.close()


async def _fill(store: RedisStore, keys: list[str]) -> None:
    for i in range(0, len(keys), 200):
        await store._pipeline([("SET", k) + ("v",) for k in keys[i : i + 200]])  # type: ignore[misc]


async def _existing(store: RedisStore, keys: list[str]) -> set[str]:
    values = await store._pipeline([("EXISTS", k) for k in keys])
    return {k for k, v in zip(keys, values, strict=True) if v}


@pytest.mark.redis
class TestTenantPurgeOnACluster:
    @pytest.mark.parametrize("victim", HOSTILE_TENANTS, ids=lambda t: repr(t)[:20])
    async def test_a_hostile_tenant_id_purges_exactly_its_own_entries(
        self, cluster_store: RedisStore, redis_cluster: Any, victim: str
    ) -> None:
        by_tenant = {
            t: [_key(t, i) for i in range(12)] + [_key(t, i, user="u:*{") for i in range(3)]
            for t in HOSTILE_TENANTS
        }
        everything = [k for keys in by_tenant.values() for k in keys]
        await _fill(cluster_store, everything)
        sizes = [int(n.command("DBSIZE")) for n in redis_cluster.nodes]
        assert all(s > 0 for s in sizes), f"keys must spread over every node: {sizes}"

        report = await Purger(cluster_store).run(PurgeSelector(tenant=victim))

        assert report.deleted == len(by_tenant[victim])
        assert report.shards == 3
        assert await _existing(cluster_store, by_tenant[victim]) == set()
        others = [k for t, keys in by_tenant.items() if t != victim for k in keys]
        assert await _existing(cluster_store, others) == set(others)


@pytest.mark.redis
class TestModelPurgeOnACluster:
    async def test_old_epochs_go_and_the_current_epoch_stays(
        self, cluster_store: RedisStore
    ) -> None:
        old = [_key("t", i, epoch=e) for i in range(40) for e in (3, 7)]
        current = [_key("t", i, epoch=9) for i in range(40)]
        # A model whose escaped name looks like an epoch must not be caught by the pattern.
        lookalike = [_key("t", i, model="e9", epoch=1) for i in range(10)]
        other_model = [_key("t", i, model="m2", epoch=1) for i in range(20)]
        await _fill(cluster_store, old + current + lookalike + other_model)
        seen: list[PurgeProgress] = []
        report = await Purger(cluster_store, batch=25).run(
            PurgeSelector(model="m", before_epoch=9), on_progress=seen.append
        )
        assert report.deleted == len(old)
        assert await _existing(cluster_store, old) == set()
        remaining = current + lookalike + other_model
        assert await _existing(cluster_store, remaining) == set(remaining)
        assert seen[-1].done and seen[-1].deleted == len(old) and seen[-1].shards_done == 3
        assert [p.deleted for p in seen] == sorted(p.deleted for p in seen)
        assert seen[0].estimate == len(old + remaining)

    async def test_everything_for_a_model_goes(self, cluster_store: RedisStore) -> None:
        mine = [_key(t, i, epoch=e) for t in ("a", "b") for i in range(20) for e in (1, 2)]
        theirs = [_key("a", i, model="m-other") for i in range(20)]
        await _fill(cluster_store, mine + theirs)
        assert await cluster_store.delete_model("m") == len(mine)
        assert await _existing(cluster_store, theirs) == set(theirs)


@pytest.mark.redis
class TestResumablePurge:
    async def test_an_interrupted_purge_resumes_and_counts_everything_once(
        self, cluster_store: RedisStore
    ) -> None:
        keys = [_key("victim", i) for i in range(600)]
        keep = [_key("bystander", i) for i in range(50)]
        await _fill(cluster_store, keys + keep)
        selector = PurgeSelector(tenant="victim")
        purger = cluster_store.purger(batch=20)
        reached = asyncio.Event()

        def on_progress(p: PurgeProgress) -> None:
            if p.deleted >= 100:
                reached.set()

        task = purger.start(selector, on_progress=on_progress)
        await reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert 0 < len(await _existing(cluster_store, keys)) < len(keys)

        report = await cluster_store.purger(batch=20).run(selector)
        assert report.resumed
        assert report.deleted == len(keys)
        assert await _existing(cluster_store, keys) == set()
        assert await _existing(cluster_store, keep) == set(keep)
        # Finished: the checkpoint is gone, so the next run starts afresh.
        assert not (await cluster_store.purger().run(selector)).resumed

    async def test_a_node_killed_mid_purge_fails_loudly_and_a_rerun_finishes(
        self, cluster_store: RedisStore, redis_cluster: Any
    ) -> None:
        keys = [_key("victim", i) for i in range(300)]
        await _fill(cluster_store, keys)
        killed = False

        def on_progress(p: PurgeProgress) -> None:
            nonlocal killed
            if not killed and p.deleted > 0:
                redis_cluster.nodes[2].kill()
                killed = True

        # StoreUnavailableError or CheckpointUnavailableError, whichever node the kill hits first.
        with pytest.raises(ConnectionError):
            await cluster_store.purger(batch=10).run(
                PurgeSelector(tenant="victim"), on_progress=on_progress
            )
        redis_cluster.restart_node(2)  # the node comes back empty (no persistence)
        fresh = open_store(redis_cluster.url, socket_timeout=2.0)
        try:
            await fresh.purger(batch=10).run(PurgeSelector(tenant="victim"))  # type: ignore[attr-defined]
            assert await _existing(fresh, keys) == set()  # type: ignore[arg-type]
        finally:
            await fresh.close()


class TestPurgeSelector:
    def test_a_selector_must_name_a_model_or_a_tenant(self) -> None:
        with pytest.raises(InvalidSelectorError, match="--model M"):
            PurgeSelector()

    def test_before_epoch_needs_a_model(self) -> None:
        with pytest.raises(InvalidSelectorError, match="before_epoch: needs a model"):
            PurgeSelector(tenant="t", before_epoch=3)

    def test_the_same_purge_has_the_same_job_id(self) -> None:
        assert PurgeSelector(tenant="a").job_id == PurgeSelector(tenant="a").job_id
        assert PurgeSelector(tenant="a").job_id != PurgeSelector(tenant="b").job_id


class TestReclaimOnRollout:
    async def test_a_rollout_reclaims_the_old_epochs_in_the_background(self) -> None:
        from cachesvc.store import EmbeddedStore
        from invalidation import EmbeddedRegistry, EpochView, reclaim_on_rollout

        registry = EmbeddedRegistry()
        store = EmbeddedStore()
        first = (await registry.rollout("m", "v1")).current
        view = EpochView(registry)
        view.subscribe(reclaim_on_rollout(Purger(store)))
        await view.start()
        await view.stop()
        for i in range(10):
            await store.set(_key("t", i, epoch=first.epoch), b"v")
            await store.set(_key("t", i, model="other", epoch=first.epoch), b"v")
        second = (await registry.rollout("m", "v2")).current
        await store.set(_key("t", 0, epoch=second.epoch), b"v")
        await view.poll()
        for _ in range(100):
            if len(store) == 11:
                break
            await asyncio.sleep(0.01)
        assert len(store) == 11
        assert await store.get(_key("t", 0, epoch=second.epoch)) == b"v"


class TestStrictCheckFailsClosed:
    async def test_an_unknown_model_is_not_current_in_strict_mode(self) -> None:
        from invalidation import EmbeddedRegistry, EpochView

        view = EpochView(EmbeddedRegistry(), strict=True)
        assert await view.is_current("never-rolled-out", 1) is False
