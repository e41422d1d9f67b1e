"""Every Redis client the service builds, from ``[redis] url`` and ``[redis] nodes``.

One parser and one builder, so the response store, the audit journal and the admin commands
reach the same deployment with the same credentials: ``redis://``, ``rediss://`` or
``unix://`` name a standalone server; ``redis+cluster://[user:password@]host:port[,host:port]``
(``rediss+cluster://`` for TLS) or a ``nodes`` list name a Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from cachesvc.store.errors import StoreConfigError

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
STANDALONE_SCHEMES = ("redis", "rediss", "unix")

SyncClient = redis.Redis | RedisCluster
AsyncClient = aioredis.Redis | AsyncRedisCluster


@dataclass(frozen=True, kw_only=True, slots=True)
class RedisTarget:
    """Where a Redis deployment is, parsed once: a standalone ``url``, or cluster ``nodes``."""

    url: str | None = None
    nodes: tuple[tuple[str, int], ...] = ()
    ssl: bool = False
    username: str | None = None
    password: str | None = None

    @property
    def cluster(self) -> bool:
        return bool(self.nodes)


def parse_node(item: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:7000"`` for IPv6) as ``(host, port)``."""
    if isinstance(item, tuple):
        return item[0], int(item[1])
    host, sep, port = item.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise StoreConfigError(
            f"redis.nodes: {item!r} is not host:port; write e.g. \"10.0.0.1:7000\""
        )
    return host.strip("[]"), int(port)


def redis_target(url: str | None, nodes: Sequence[str | tuple[str, int]] | None = None
                 ) -> RedisTarget | None:
    """The deployment ``url`` and ``nodes`` name; None for neither (the embedded store).
    A bad URL or node raises :class:`StoreConfigError` naming the setting and the fix."""
    if not url and not nodes:
        return None
    scheme = urlsplit(url).scheme if url else ""
    if nodes or scheme in CLUSTER_SCHEMES:
        startup = [parse_node(n) for n in nodes or ()]
        ssl = False
        username = password = None
        if url:
            parts = urlsplit(url)
            ssl = parts.scheme == "rediss+cluster"
            netloc = parts.netloc
            if "@" in netloc:
                cred, _, netloc = netloc.rpartition("@")
                user, _, pw = cred.partition(":")
                username, password = unquote(user) or None, unquote(pw) or None
            startup += [parse_node(n) for n in netloc.split(",") if n]
        if not startup:
            raise StoreConfigError("redis.url: a cluster URL needs host:port, e.g. "
                                   "redis+cluster://10.0.0.1:7000")
        return RedisTarget(nodes=tuple(startup), ssl=ssl, username=username, password=password)
    if scheme not in STANDALONE_SCHEMES:
        raise StoreConfigError(
            f"redis.url: scheme {scheme!r} is not supported; use redis://host:port/db, "
            "rediss://..., unix:///path.sock, or redis+cluster://host:port for Redis Cluster"
        )
    return RedisTarget(url=url)


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
