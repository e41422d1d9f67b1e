"""Where CLI commands find Redis: ``--redis URL``, else ``[redis] url`` / ``nodes`` from the
service's settings (``--config F`` or ``$CACHESVC_CONFIG``, and the environment)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cachesvc.cli.errors import fail, load_settings_or_fail
from cachesvc.store import StoreConfigError, open_store
from cachesvc.store.redis_store import RedisStore


def redis_target(redis_url: str | None, config: Path | None) -> tuple[str | None, list[str]]:
    """The Redis URL and cluster startup nodes the command should use: ``--redis``, else the
    settings the service would read (``--config F`` / ``$CACHESVC_CONFIG``, and the
    ``CACHESVC_REDIS__*`` environment)."""
    if redis_url:
        return redis_url, []
    redis = load_settings_or_fail(config).redis
    return redis.url, list(redis.nodes)


def open_redis_store(redis_url: str | None, config: Path | None) -> RedisStore:
    """A Redis store for an admin command: ``--redis``, else the settings' ``[redis]``."""
    return open_redis_store_at(*redis_target(redis_url, config))


def open_redis_store_at(url: str | None, nodes: Sequence[str]) -> RedisStore:
    """A Redis store at ``url`` (or the cluster of ``nodes``) for an admin command or the
    offline scan (generous timeouts: these are not on the hot path)."""
    if not url and not nodes:
        fail(
            "no Redis configured, and the embedded store lives inside the service process: "
            "pass --url http://HOST:PORT (with --admin-key) to work through the running "
            "service, or --redis redis://host:6379/0 (or --config F with [redis] url)"
        )
    try:
        store = open_store(url, nodes=list(nodes) or None, socket_timeout=10.0,
                           connect_timeout=5.0)
    except StoreConfigError as exc:
        fail(str(exc))
    assert isinstance(store, RedisStore)
    return store
