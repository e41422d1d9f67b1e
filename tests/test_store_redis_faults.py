"""The Redis store under faults: a hung or dead server is an error within the timeout, never a
hang; a restarted server works again; a dead cluster node affects only its own slots."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cachesvc.store import StoreUnavailableError, open_store, storage_key
from keying import Scope
from tests.store_helpers import digest_of

pytestmark = pytest.mark.redis


def k(i: int) -> str:
    return storage_key(scope=Scope.for_tenant("t"), model="m", epoch=1, digest=digest_of(i))


class TestStandaloneFaults:
    async def test_a_hung_server_fails_within_the_socket_timeout(
        self, redis_standalone: Any) -> None:
        store = open_store(redis_standalone.url, socket_timeout=0.2, retries=0)
        await store.set(k(1), b"v", ttl=60)
        redis_standalone.pause()
        try:
            start = time.monotonic()
            with pytest.raises(StoreUnavailableError, match="Timeout"):
                await store.get(k(1))
            assert time.monotonic() - start < 1.0
        finally:
            redis_standalone.resume()
            await store.close()

    async def test_a_dead_server_is_unavailable_and_a_restart_recovers(
        self, redis_standalone: Any
    ) -> None:
        store = open_store(redis_standalone.url, socket_timeout=0.5)
        await store.set(k(1), b"v", ttl=60)
        redis_standalone.kill()
        with pytest.raises(StoreUnavailableError):
            await store.get(k(1))
        with pytest.raises(StoreUnavailableError):
            await store.set(k(1), b"v", ttl=60)
        redis_standalone.restart()
        assert await store.get(k(1)) is None  # the restarted cache node came back empty
        await store.set(k(1), b"w", ttl=60)
        assert await store.get(k(1)) == b"w"
        await store.close()


class TestClusterFaults:
    async def test_a_dead_node_costs_only_its_own_keys(self, redis_cluster: Any) -> None:
        store = open_store(redis_cluster.url, socket_timeout=0.5)
        for i in range(60):
            await store.set(k(i), b"v", ttl=60)
        dead = redis_cluster.nodes[0]
        dead.kill()
        ok = failed = 0
        for i in range(60):
            try:
                assert await store.get(k(i)) == b"v"
                ok += 1
            except StoreUnavailableError:
                failed += 1
        assert ok > 0 and failed > 0
        redis_cluster.restart_node(0)
        await store.close()
