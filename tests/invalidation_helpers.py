"""Factories for registries over the three backends, shared by the invalidation tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from invalidation import EmbeddedRegistry, ModelRegistry, RedisRegistry


def redis_client(request: pytest.FixtureRequest, kind: str) -> Redis | RedisCluster:
    request.applymarker(pytest.mark.redis)
    if kind == "standalone":
        server = request.getfixturevalue("redis_standalone")
        return Redis(host=server.host, port=server.port, socket_timeout=2.0)
    cluster = request.getfixturevalue("redis_cluster")
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes], socket_timeout=2.0
    )


async def registry_for(
    request: pytest.FixtureRequest, kind: str
) -> AsyncIterator[ModelRegistry]:
    if kind == "embedded":
        yield EmbeddedRegistry()
        return
    client = redis_client(request, kind)
    yield RedisRegistry(client)
    await client.aclose()
