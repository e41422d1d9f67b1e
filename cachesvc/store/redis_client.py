"""Every Redis client the service builds, for a :class:`~cachesvc.store.targets.RedisTarget`.

One builder (and one parser, in :mod:`cachesvc.store.targets`), so the response store, the audit
journal and the admin commands reach the same deployment with the same credentials.
"""

from __future__ import annotations

from typing import Literal, overload

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from cachesvc.store.targets import RedisTarget

SyncClient = redis.Redis | RedisCluster
AsyncClient = aioredis.Redis | AsyncRedisCluster


@overload
def redis_client(target: RedisTarget, *, flavour: Literal["async"], socket_timeout: float,
                 connect_timeout: float, retries: int | None = ...,
                 max_connections: int | None = ...) -> AsyncClient: ...
@overload
def redis_client(target: RedisTarget, *, flavour: Literal["sync"], socket_timeout: float,
                 connect_timeout: float, retries: int | None = ...,
                 max_connections: int | None = ...) -> SyncClient: ...
def redis_client(target: RedisTarget, *, flavour: Literal["async", "sync"],
                 socket_timeout: float, connect_timeout: float, retries: int | None = None,
                 max_connections: int | None = None) -> AsyncClient | SyncClient:
    """A redis-py client for ``target``: asyncio (the store, the registry) or blocking (the
    audit journal, written from the auditor's thread). ``retries``: of a failed command on a
    fresh connection, without backoff (None: redis-py's default policy)."""
    common: dict[str, object] = {"socket_timeout": socket_timeout,
                                 "socket_connect_timeout": connect_timeout}
    if max_connections is not None:
        common["max_connections"] = max_connections
    if retries is not None:
        from redis.backoff import NoBackoff

        if flavour == "async":
            from redis.asyncio.retry import Retry as AsyncRetry

            common["retry"] = AsyncRetry(NoBackoff(), retries)
        else:
            from redis.retry import Retry

            common["retry"] = Retry(NoBackoff(), retries)
    if target.cluster:
        cluster: dict[str, object] = {
            "ssl": target.ssl, "username": target.username, "password": target.password,
            # A degraded cluster still serves the slots it has: a missing node costs its keys.
            "require_full_coverage": False,
        }
        if flavour == "async":
            from redis.asyncio.cluster import ClusterNode as AsyncNode

            return AsyncRedisCluster(startup_nodes=[AsyncNode(h, p) for h, p in target.nodes],
                                     **cluster, **common)  # type: ignore[arg-type]
        from redis.cluster import ClusterNode

        nodes = [ClusterNode(h, p) for h, p in target.nodes]  # type: ignore[no-untyped-call]
        return RedisCluster(startup_nodes=nodes, **cluster, **common)  # type: ignore[arg-type]
    assert target.url is not None
    if flavour == "async":
        return aioredis.Redis.from_url(target.url, **common)  # type: ignore[arg-type]
    return redis.Redis.from_url(target.url, **common)
