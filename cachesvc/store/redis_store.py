"""The Redis response store: redis-py asyncio with hiredis, standalone or Redis Cluster.

Every entry operation is a single-key command, so nothing needs a cross-slot multi-key
operation. Purges and the offline scan walk every primary with its own SCAN cursor and delete
with per-key UNLINKs in a pipeline. Connection and socket timeouts are always set, so no call
can hang; a backend failure raises :class:`StoreUnavailableError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import ClusterNode, RedisCluster

from cachesvc.store.base import (
    ALL_ENTRIES_PATTERN,
    check_set_args,
    key_matches,
    parse_storage_key,
    selector_pattern,
)
from cachesvc.store.errors import StoreUnavailableError
from cachesvc.store.pipelined_get import PipelinedGet
from invalidation.purge import Purger, PurgeSelector, RedisCheckpoints

STANDALONE_SHARD = "standalone"
#: redis-py raises these when the server is unreachable, slow or the cluster is reconfiguring.
BACKEND_ERRORS: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
    rexc.MasterDownError,
    rexc.BusyLoadingError,
    rexc.RedisClusterException,
    OSError,
    TimeoutError,
)


def _unavailable(exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(f"redis unavailable: {type(exc).__name__}: {exc}")


class RedisStore:
    """A response store over a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster``."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        max_entry_bytes: int = 8 * 1024 * 1024,
        owns_client: bool = True,
        getter: PipelinedGet | None = None,
    ) -> None:
        self.client = client
        self.is_cluster = isinstance(client, RedisCluster)
        self.max_entry_bytes = max_entry_bytes
        self._owns_client = owns_client
        #: The hit path's GETs, when given (a standalone Redis); otherwise redis-py's.
        self._getter = getter

    def own_timeout_s(self, op: str) -> float | None:
        """The deadline this store keeps itself for ``op``, if any: the pipelined GET's
        watchdog (a GET on a fresh connection also waits for it to connect, within the
        client's connect timeout)."""
        return self._getter.timeout if op == "get" and self._getter is not None else None

    # -- the contract -------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        if self._getter is not None:
            return await self._getter.get(key)
        try:
            # bytes: the client is made without decode_responses
            return cast("bytes | None", await self.client.get(key))
        except BACKEND_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        check_set_args(value, ttl, self.max_entry_bytes)
        try:
            if ttl is None:
                await self.client.set(key, value)
            else:
                # Millisecond TTLs, at least 1 ms: `PX 0` is an error, not "expire now".
                await self.client.set(key, value, px=max(1, int(ttl * 1000)))
        except BACKEND_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def delete(self, key: str) -> bool:
        try:
            return bool(await self.client.unlink(key))
        except BACKEND_ERRORS as exc:
            raise _unavailable(exc) from exc

    async def claim(self, key: str, *, ttl: float) -> bool:
        try:
            return bool(await self.client.set(key, b"1", nx=True, px=max(1, int(ttl * 1000))))
        except BACKEND_ERRORS as exc:
            raise _unavailable(exc) from exc

    def purger(self, *, batch: int = 500) -> Purger:
        """A purger that checkpoints in this Redis, so an interrupted purge resumes."""
        return Purger(self, checkpoints=RedisCheckpoints(self.client), batch=batch)

    async def delete_tenant(self, tenant: str) -> int:
        return (await self.purger().run(PurgeSelector(tenant=tenant))).deleted

    async def delete_model(self, model: str, *, before_epoch: int | None = None) -> int:
        selector = PurgeSelector(model=model, before_epoch=before_epoch)
        return (await self.purger().run(selector)).deleted

    async def scan_entries(self, *, batch: int = 500) -> AsyncIterator[tuple[str, bytes]]:
        for shard in await self.purge_shards():
            cursor: str | None = "0"
            while cursor is not None:
                cursor, keys = await self._scan(shard, cursor, ALL_ENTRIES_PATTERN, batch)
                keys = [k for k in keys if parse_storage_key(k) is not None]
                if not keys:
                    continue
                values = await self._pipeline([("GET", k) for k in keys])
                for key, value in zip(keys, values, strict=True):
                    if isinstance(value, bytes):  # expired or deleted since the SCAN: skip
                        yield key, value

    def node_of(self, key: str) -> str | None:
        """``host:port`` of the cluster node that holds ``key`` (None off a cluster, or while
        the slot map is being refreshed: attribution in a report is best effort)."""
        if not self.is_cluster:
            return None
        try:
            node = self.client.get_node_from_key(key)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - a slot map being refreshed
            return None
        return f"{node.host}:{node.port}" if node is not None else None

    async def close(self) -> None:
        if self._getter is not None:
            await self._getter.close()
        if self._owns_client:
            with contextlib.suppress(*BACKEND_ERRORS):
                await self.client.aclose()

    # -- purge target -------------------------------------------------------------------------

    async def purge_shards(self) -> Sequence[str]:
        if not self.is_cluster:
            return [STANDALONE_SHARD]
        try:
            await self.client.initialize()
        except BACKEND_ERRORS as exc:
            raise _unavailable(exc) from exc
        assert isinstance(self.client, RedisCluster)
        return sorted(n.name for n in self.client.get_primaries())

    async def purge_scan(
        self, shard: str, cursor: str, selector: PurgeSelector, count: int
    ) -> tuple[str | None, list[str], int]:
        nxt, keys = await self._scan(shard, cursor, selector_pattern(selector), count)
        found = []
        for key in keys:
            parts = parse_storage_key(key)
            if parts is not None and key_matches(parts, selector):
                found.append(key)
        return nxt, found, len(keys)

    async def purge_delete(self, shard: str, keys: Sequence[str]) -> int:
        # NOTE: one UNLINK per key: keys of one node may still sit in different slots, and a
        # multi-key UNLINK across slots is a CROSSSLOT error in a cluster.
        results = await self._pipeline([("UNLINK", k) for k in keys])
        return sum(int(r) for r in results if isinstance(r, int))

    async def purge_estimate(self, shard: str) -> int | None:
        try:
            if not self.is_cluster:
                return int(await self.client.dbsize())
            node = self._node(shard)
            if node is None:
                return 0
            return int(await self.client.execute_command("DBSIZE", target_nodes=node))
        except BACKEND_ERRORS:
            return None

    # -- helpers ------------------------------------------------------------------------------

    def _node(self, shard: str) -> ClusterNode | None:
        assert isinstance(self.client, RedisCluster), "shards other than the one are a cluster's"
        return self.client.get_node(node_name=shard)

    async def _scan(
        self, shard: str, cursor: str, pattern: str, count: int
    ) -> tuple[str | None, list[str]]:
        try:
            if not self.is_cluster:
                nxt, raw = await self.client.scan(cursor=int(cursor), match=pattern, count=count)
            else:
                node = self._node(shard)
                if node is None:
                    # The node left the cluster; its slots' keys now live on a node we also walk.
                    return None, []
                reply: Any = await self.client.scan(
                    cursor=int(cursor), match=pattern, count=count, target_nodes=node
                )
                cursors, raw = reply
                nxt = cursors[node.name] if isinstance(cursors, dict) else cursors
        except BACKEND_ERRORS as exc:
            raise _unavailable(exc) from exc
        keys = [k.decode("utf-8", "replace") if isinstance(k, bytes) else k for k in raw]
        return (None if int(nxt) == 0 else str(nxt)), keys

    async def _pipeline(self, commands: list[tuple[str, str]]) -> list[Any]:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for cmd in commands:
                    pipe.execute_command(*cmd)
                return list(await pipe.execute(raise_on_error=False))
        except BACKEND_ERRORS as exc:
            raise _unavailable(exc) from exc
