"""Where CLI commands find Redis: ``--redis URL``, else ``[redis] url`` / ``nodes`` in the TOML
config file (``--config F`` or ``$CACHESVC_CONFIG``)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import typer

from cachesvc.store import StoreConfigError, open_store
from cachesvc.store.redis_store import RedisStore


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def redis_target(redis_url: str | None, config: Path | None) -> tuple[str | None, list[str]]:
    """The Redis URL and cluster startup nodes the command should use."""
    if redis_url:
        return redis_url, []
    path = config or (Path(os.environ["CACHESVC_CONFIG"]) if os.environ.get("CACHESVC_CONFIG")
                      else None)
    if path is None:
        return None, []
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        fail(f"--config {path}: cannot read it ({exc.strerror}); pass an existing TOML file")
    except tomllib.TOMLDecodeError as exc:
        fail(f"--config {path}: not valid TOML ({exc}); fix the file")
    section = data.get("redis", {})
    if not isinstance(section, dict):
        fail(f"--config {path}: [redis] must be a table with url = \"redis://...\"")
    url = section.get("url")
    nodes = section.get("nodes", [])
    if url is not None and not isinstance(url, str):
        fail(f"--config {path}: redis.url must be a string such as \"redis://host:6379/0\"")
    if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
        fail(f"--config {path}: redis.nodes must be a list of \"host:port\" strings")
    return url, nodes


def open_redis_store(redis_url: str | None, config: Path | None) -> RedisStore:
    """A Redis store for an admin command (generous timeouts: these are not on the hot path)."""
    url, nodes = redis_target(redis_url, config)
    if not url and not nodes:
        fail(
            "this command needs the shared Redis: pass --redis redis://host:6379/0 (or "
            "redis+cluster://host:port), or --config F with [redis] url. The embedded store "
            "lives inside the service process and cannot be reached from here."
        )
    try:
        store = open_store(url, nodes=nodes or None, socket_timeout=10.0, connect_timeout=5.0)
    except StoreConfigError as exc:
        fail(str(exc))
    assert isinstance(store, RedisStore)
    return store
