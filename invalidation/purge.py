"""Background, resumable purges of cached entries: old epochs of a model, one tenant, or
everything for a model.

A rollout already makes old entries unreachable (the epoch is in the key); a purge only gives
their memory back, or honours a tenant's deletion request. It walks every shard (every primary of
a Redis Cluster) with a cursor, deletes in batches, reports progress, and checkpoints its cursors
so an interrupted purge resumes where it stopped. The stores implement :class:`PurgeTarget`;
nothing here knows the storage-key layout (``invalidation`` does not import ``cachesvc``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import structlog

from invalidation.errors import CheckpointUnavailableError, InvalidSelectorError
from keying import escape_component

log = structlog.get_logger()

START = "0"


@dataclass(frozen=True, kw_only=True, slots=True)
class PurgeSelector:
    """Which entries a purge removes. Conditions combine with AND.

    ``model`` alone: every entry of that model. ``model`` + ``before_epoch``: that model's entries
    with ``epoch < before_epoch`` (reclaiming old epochs). ``tenant``: every entry of that tenant,
    in tenant and user scopes (a deletion request).
    """

    model: str | None = None
    before_epoch: int | None = None
    tenant: str | None = None

    def __post_init__(self) -> None:
        if self.model is None and self.tenant is None:
            raise InvalidSelectorError(
                "purge: name --model M (optionally with --before-epoch N) or --tenant T"
            )
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise InvalidSelectorError(f"model: {self.model!r} is not a non-empty string")
        if self.tenant is not None and (not isinstance(self.tenant, str) or not self.tenant):
            raise InvalidSelectorError(f"tenant: {self.tenant!r} is not a non-empty string")
        if self.before_epoch is not None:
            if self.model is None:
                raise InvalidSelectorError("before_epoch: needs a model; pass --model M too")
            if (
                isinstance(self.before_epoch, bool)
                or not isinstance(self.before_epoch, int)
                or self.before_epoch < 0
            ):
                raise InvalidSelectorError(
                    f"before_epoch: {self.before_epoch!r} is not a non-negative integer"
                )

    @property
    def job_id(self) -> str:
        """Stable id: running the same purge again resumes the interrupted one."""
        raw = json.dumps(asdict(self), sort_keys=True, ensure_ascii=True).encode()
        return "purge-" + hashlib.blake2b(raw, digest_size=10).hexdigest()

    def describe(self) -> str:
        parts = []
        if self.model is not None:
            parts.append(f"model={self.model!r}")
        if self.before_epoch is not None:
            parts.append(f"epoch<{self.before_epoch}")
        if self.tenant is not None:
            parts.append(f"tenant={self.tenant!r}")
        return " ".join(parts)


class PurgeTarget(Protocol):
    """What a store offers a purge: shards, a cursor walk per shard, and batch deletion."""

    async def purge_shards(self) -> Sequence[str]:
        """Stable names of the shards (Redis Cluster primaries as ``host:port``)."""
        ...

    async def purge_scan(
        self, shard: str, cursor: str, selector: PurgeSelector, count: int
    ) -> tuple[str | None, list[str], int]:
        """One step from ``cursor`` (``"0"`` to start): ``(next cursor or None when the shard is
        done, keys that exactly match the selector, keys looked at)``."""
        ...

    async def purge_delete(self, shard: str, keys: Sequence[str]) -> int:
        """Delete ``keys`` (all from ``shard``); return how many existed."""
        ...

    async def purge_estimate(self, shard: str) -> int | None:
        """Roughly how many keys the shard holds (for a progress bar), or None."""
        ...


class CheckpointStore(Protocol):
    """Where a purge keeps its cursors between batches."""

    async def load(self, job_id: str) -> dict[str, Any] | None: ...

    async def save(self, job_id: str, state: dict[str, Any]) -> None: ...

    async def clear(self, job_id: str) -> None: ...


class MemoryCheckpoints:
    """Checkpoints in this process (an embedded store does not outlive it either)."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}

    async def load(self, job_id: str) -> dict[str, Any] | None:
        state = self.states.get(job_id)
        return json.loads(json.dumps(state)) if state is not None else None

    async def save(self, job_id: str, state: dict[str, Any]) -> None:
        self.states[job_id] = json.loads(json.dumps(state))

    async def clear(self, job_id: str) -> None:
        self.states.pop(job_id, None)


class RedisCheckpoints:
    """Checkpoints in Redis (one key per job, hash-tagged, expiring after ``ttl_s`` idle)."""

    def __init__(self, client: Any, *, ttl_s: int = 7 * 24 * 3600) -> None:
        self._client = client
        self._ttl_s = ttl_s

    @staticmethod
    def key(job_id: str) -> str:
        return "llmc:{purge}:job:" + escape_component(job_id)

    async def load(self, job_id: str) -> dict[str, Any] | None:
        try:
            raw = await self._client.get(self.key(job_id))
        except Exception as exc:
            raise _checkpoint_error(exc) from exc
        return json.loads(raw) if raw else None

    async def save(self, job_id: str, state: dict[str, Any]) -> None:
        try:
            await self._client.set(self.key(job_id), json.dumps(state), ex=self._ttl_s)
        except Exception as exc:
            raise _checkpoint_error(exc) from exc

    async def clear(self, job_id: str) -> None:
        try:
            await self._client.delete(self.key(job_id))
        except Exception as exc:
            raise _checkpoint_error(exc) from exc


def _checkpoint_error(exc: BaseException) -> CheckpointUnavailableError:
    return CheckpointUnavailableError(
        f"purge checkpoint unavailable: {type(exc).__name__}: {exc}; run the purge again to resume"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class PurgeProgress:
    """A snapshot, passed to progress callbacks after every batch."""

    job_id: str
    shards_total: int
    shards_done: int
    scanned: int
    deleted: int
    estimate: int | None
    done: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class PurgeReport:
    """The final count of a purge."""

    job_id: str
    selector: PurgeSelector
    deleted: int
    scanned: int
    shards: int
    resumed: bool
    seconds: float


ProgressCallback = Callable[[PurgeProgress], Awaitable[None] | None]


class Purger:
    """Runs purges against a :class:`PurgeTarget`, checkpointing after every batch."""

    def __init__(
        self,
        target: PurgeTarget,
        *,
        checkpoints: CheckpointStore | None = None,
        batch: int = 500,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch < 1:
            raise InvalidSelectorError(f"batch: {batch} must be at least 1")
        self._target = target
        self._checkpoints = checkpoints if checkpoints is not None else MemoryCheckpoints()
        self._batch = batch
        self._clock = clock

    def start(
        self, selector: PurgeSelector, *, on_progress: ProgressCallback | None = None
    ) -> asyncio.Task[PurgeReport]:
        """Run the purge as a background task. Cancelling it leaves a checkpoint to resume."""
        return asyncio.create_task(self.run(selector, on_progress=on_progress))

    async def run(
        self, selector: PurgeSelector, *, on_progress: ProgressCallback | None = None
    ) -> PurgeReport:
        """Run (or resume) the purge to the end and return the final count."""
        started = self._clock()
        job_id = selector.job_id
        shards = list(await self._target.purge_shards())
        saved = await self._checkpoints.load(job_id)
        resumed = saved is not None
        cursors: dict[str, str | None] = dict.fromkeys(shards, START)
        # A batch between "keys found" and "deletion recorded": kept in the checkpoint so a
        # resumed purge finishes it and still counts it exactly once.
        pending: dict[str, dict[str, Any]] = {}
        scanned = deleted = 0
        if saved is not None:
            # A shard that no longer exists is dropped; a new one starts from the beginning.
            for shard, cur in saved.get("cursors", {}).items():
                if shard in cursors:
                    cursors[shard] = cur
            scanned = int(saved.get("scanned", 0))
            deleted = int(saved.get("deleted", 0))
            for shard, batch in saved.get("pending", {}).items():
                if shard in cursors:
                    await self._target.purge_delete(shard, batch["keys"])
                    deleted += len(batch["keys"])
                    scanned += int(batch["looked"])
                    cursors[shard] = batch["cursor"]
        estimates = await asyncio.gather(*(self._target.purge_estimate(s) for s in shards))
        estimate = None if any(e is None for e in estimates) else sum(e or 0 for e in estimates)
        lock = asyncio.Lock()
        log.info("purge.start", job_id=job_id, selector=selector.describe(), shards=len(shards),
                 resumed=resumed)

        async def checkpoint() -> None:
            await self._checkpoints.save(
                job_id,
                {
                    "selector": asdict(selector),
                    "cursors": cursors,
                    "pending": pending,
                    "scanned": scanned,
                    "deleted": deleted,
                },
            )

        async def report(done: bool) -> None:
            if on_progress is None:
                return
            progress = PurgeProgress(
                job_id=job_id,
                shards_total=len(shards),
                shards_done=sum(1 for c in cursors.values() if c is None),
                scanned=scanned,
                deleted=deleted,
                estimate=estimate,
                done=done,
            )
            result = on_progress(progress)
            if asyncio.iscoroutine(result):
                await result

        stopped = False

        async def walk(shard: str) -> None:
            nonlocal scanned, deleted
            while not stopped and (cursor := cursors[shard]) is not None:
                nxt, keys, looked = await self._target.purge_scan(
                    shard, cursor, selector, self._batch
                )
                if stopped:
                    return
                removed = 0
                if keys:
                    async with lock:
                        pending[shard] = {"cursor": nxt, "keys": keys, "looked": looked}
                        await checkpoint()
                    removed = await self._target.purge_delete(shard, keys)
                async with lock:
                    pending.pop(shard, None)
                    cursors[shard] = nxt
                    scanned += looked
                    deleted += removed
                    await checkpoint()
                    await report(False)

        await report(False)
        try:
            await asyncio.gather(*(walk(s) for s in shards))
        except BaseException:
            # NOTE: on Python 3.11 a cancellation can be lost inside a client's own timeout
            # handling; the flag stops every walker at its next step, so no orphan keeps
            # deleting (and double-counting) behind a resumed run.
            stopped = True
            raise
        await self._checkpoints.clear(job_id)
        await report(True)
        result = PurgeReport(
            job_id=job_id,
            selector=selector,
            deleted=deleted,
            scanned=scanned,
            shards=len(shards),
            resumed=resumed,
            seconds=self._clock() - started,
        )
        log.info("purge.done", job_id=job_id, deleted=deleted, scanned=scanned,
                 seconds=round(result.seconds, 3))
        return result


def reclaim_on_rollout(purger: Purger) -> Callable[[str, int | None, int], None]:
    """An :meth:`EpochView.subscribe` listener that, on every rollout, starts a background purge
    of the model's older epochs (they are unreachable already; this gives their memory back).

    Subscribe it on one replica only: the purge covers the whole store.
    """
    tasks: set[asyncio.Task[PurgeReport]] = set()

    def listener(model: str, old_epoch: int | None, new_epoch: int) -> None:
        if old_epoch is None:
            return
        task = purger.start(PurgeSelector(model=model, before_epoch=new_epoch))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return listener
