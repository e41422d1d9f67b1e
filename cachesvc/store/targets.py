"""Where a Redis deployment is, from ``[redis] url`` and ``[redis] nodes``: parsed without
loading redis-py, so a service on the embedded store (no URL, no nodes) never imports it.

``redis://``, ``rediss://`` or ``unix://`` name a standalone server;
``redis+cluster://[user:password@]host:port[,host:port]`` (``rediss+cluster://`` for TLS) or a
``nodes`` list name a Redis Cluster. :mod:`cachesvc.store.redis_client` builds the clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from cachesvc.store.errors import StoreConfigError

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
STANDALONE_SCHEMES = ("redis", "rediss", "unix")

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
            ssl = scheme == "rediss+cluster"
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
