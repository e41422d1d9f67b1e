"""Durable invalidation events, and each replica's view of the model epochs.

A rollout appends a :class:`RolloutEvent` to a Redis Stream in the same atomic step that writes
the registry (see :mod:`invalidation.registry`). Every replica runs an :class:`EpochView`:

* it polls the stream from its own cursor (a plain ``XREAD``, not a consumer group: every
  replica must see every event), so a rollout reaches it within ``poll_interval``;
* it re-reads the whole registry every ``refresh_interval / 2``; and
* it refuses to answer (raises :class:`StaleViewError`) once its last confirmed registry read
  *started* more than ``refresh_interval`` ago.

NOTE: only a full registry read counts as a confirmation, never an event. So whatever happens to
events (lost, trimmed, a consumer bug), a lookup that starts ``refresh_interval`` seconds after a
rollout was acknowledged either uses the new epoch or is a miss. That is the documented staleness
bound, and it holds by construction on the read path rather than by the loop being on time.

``strict=True`` additionally re-reads the model's registry entry on every hit
(:meth:`EpochView.is_current`), so nothing older than the acknowledged rollout is ever served.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from invalidation.errors import (
    InvalidationError,
    RegistryUnavailableError,
    StaleViewError,
    UnknownModelError,
)
from invalidation.types import ModelVersion, RolloutEvent

if TYPE_CHECKING:
    from invalidation.registry import ModelRegistry

log = structlog.get_logger()

#: The cursor before the first event.
START = "0-0"


class EventLog(Protocol):
    """An append-only, ordered, durable log of rollout events."""

    async def read_after(self, cursor: str, *, count: int = 100) -> list[RolloutEvent]:
        """Events strictly after ``cursor`` (oldest first), at most ``count``."""
        ...

    async def last_id(self) -> str:
        """The id of the newest event (``START`` if none)."""
        ...

    async def first_id(self) -> str | None:
        """The id of the oldest event still kept (None if empty): a cursor older than this
        may have missed trimmed events."""
        ...


def _id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def id_after(a: str, b: str) -> bool:
    """True if stream id ``a`` is strictly after ``b``."""
    return _id_key(a) > _id_key(b)


class MemoryEventLog:
    """The event log of an embedded registry (one process)."""

    def __init__(self) -> None:
        self._events: list[RolloutEvent] = []

    def next_id(self) -> str:
        return f"{len(self._events) + 1}-0"

    def append(self, event: RolloutEvent) -> None:
        self._events.append(event)

    async def read_after(self, cursor: str, *, count: int = 100) -> list[RolloutEvent]:
        return [e for e in self._events if id_after(e.id, cursor)][:count]

    async def last_id(self) -> str:
        return self._events[-1].id if self._events else START

    async def first_id(self) -> str | None:
        return self._events[0].id if self._events else None


class RedisEventLog:
    """The rollout stream in Redis (standalone or Cluster; one hash-tagged key)."""

    def __init__(self, client: Any, key: str) -> None:
        self._client = client
        self.key = key

    async def read_after(self, cursor: str, *, count: int = 100) -> list[RolloutEvent]:
        try:
            reply = await self._client.xread({self.key: cursor}, count=count)
        except Exception as exc:
            raise _unavailable(exc) from exc
        events = []
        for _stream, items in reply or []:
            for event_id, fields in items:
                events.append(parse_event(event_id, fields))
        return events

    async def last_id(self) -> str:
        try:
            items = await self._client.xrevrange(self.key, count=1)
        except Exception as exc:
            raise _unavailable(exc) from exc
        return _s(items[0][0]) if items else START

    async def first_id(self) -> str | None:
        try:
            items = await self._client.xrange(self.key, count=1)
        except Exception as exc:
            raise _unavailable(exc) from exc
        return _s(items[0][0]) if items else None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unavailable(exc: BaseException) -> InvalidationError:
    if isinstance(exc, InvalidationError):
        return exc
    return RegistryUnavailableError(f"registry redis unavailable: {type(exc).__name__}: {exc}")


def parse_event(event_id: Any, fields: dict[Any, Any]) -> RolloutEvent:
    f = {_s(k): _s(v) for k, v in fields.items()}
    prev = f.get("previous", "")
    return RolloutEvent(
        id=_s(event_id),
        model=f["model"],
        version=f["version"],
        epoch=int(f["epoch"]),
        previous_epoch=int(prev) if prev else None,
        at=float(f.get("at", "0")),
    )


Listener = Callable[[str, int | None, int], Awaitable[None] | None]


class EpochView:
    """One replica's cached view of ``model -> (version, epoch)``; see the module docstring."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        refresh_interval: float = 5.0,
        poll_interval: float = 0.1,
        strict: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not refresh_interval > 0:
            raise ValueError(f"refresh_interval: {refresh_interval!r} must be positive seconds")
        if not poll_interval > 0:
            raise ValueError(f"poll_interval: {poll_interval!r} must be positive seconds")
        self.registry = registry
        self.refresh_interval = float(refresh_interval)
        self.poll_interval = float(poll_interval)
        self.strict = strict
        self._clock = clock
        self._versions: dict[str, ModelVersion] = {}
        #: The registry's genesis epoch (models never rolled out), read with every refresh.
        self.genesis: int | None = None
        self._confirmed_at: float | None = None
        self._cursor = START
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.events_applied = 0
        self.refreshes = 0

    # -- reading ------------------------------------------------------------------------------

    @property
    def cursor(self) -> str:
        """The id of the last event consumed; persist it to catch up after a restart."""
        return self._cursor

    def fresh(self) -> bool:
        return (
            self._confirmed_at is not None
            # NOTE: strict `<`: a read confirmed at the very instant of an acknowledgement may
            # have run just before it, so exactly `refresh_interval` later is already stale.
            and self._clock() - self._confirmed_at < self.refresh_interval
        )

    def current(self, model: str) -> ModelVersion:
        """The model's current version and epoch from this view.

        Raises :class:`StaleViewError` past the staleness bound (treat as a miss) and
        :class:`UnknownModelError` for a model never rolled out.
        """
        if not self.fresh():
            age = None if self._confirmed_at is None else self._clock() - self._confirmed_at
            raise StaleViewError(
                f"epoch view not confirmed within refresh_interval={self.refresh_interval}s "
                f"(last confirmed {age if age is None else round(age, 3)}s ago); treat as a miss"
            )
        try:
            return self._versions[model]
        except KeyError:
            raise UnknownModelError(
                f"model {model!r} has no rollout; run `cachesvc models rollout {model} VERSION`"
            ) from None

    async def is_current(self, model: str, epoch: int) -> bool:
        """May an entry of ``model`` at ``epoch`` be served now? In strict mode this reads the
        registry (one round trip); otherwise it answers from the view."""
        if self.strict:
            try:
                mv = await self.registry.current(model)
            except InvalidationError as exc:
                # Fail closed: an unknown model or an unreachable registry is a miss.
                log.warning("epoch_view.strict_check_failed", model=model,
                            error=type(exc).__name__)
                return False
            await self._apply(mv)
            return mv.epoch == epoch
        try:
            return self.current(model).epoch == epoch
        except (StaleViewError, UnknownModelError):
            return False

    def snapshot(self) -> dict[str, ModelVersion]:
        return dict(self._versions)

    # -- listeners ----------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(model, old_epoch, new_epoch)`` (sync or async) on every epoch change
        this view learns of; returns a function that unsubscribes."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    async def _notify(self, model: str, old: int | None, new: int) -> None:
        for listener in list(self._listeners):
            try:
                result = listener(model, old, new)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a listener's bug must not stop invalidation of the others
                log.exception("epoch_view.listener_failed", model=model, new_epoch=new)

    async def _apply(self, mv: ModelVersion) -> bool:
        """Adopt ``mv`` if it is newer; epochs only ever grow (rollbacks get fresh epochs)."""
        old = self._versions.get(mv.model)
        if old is not None and old.epoch >= mv.epoch:
            return False
        self._versions[mv.model] = mv
        await self._notify(mv.model, None if old is None else old.epoch, mv.epoch)
        return True

    # -- updating -----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the whole registry; on success the view is confirmed as of this call's start."""
        started = self._clock()
        genesis = await self.registry.genesis()
        # Epochs only grow: a registry that lost its keys issues a larger genesis.
        self.genesis = genesis if self.genesis is None else max(self.genesis, genesis)
        versions = await self.registry.list()
        for mv in versions:
            await self._apply(mv)
        if self._confirmed_at is None or started > self._confirmed_at:
            self._confirmed_at = started
        self.refreshes += 1

    async def poll(self) -> int:
        """Apply events after the cursor; return how many were applied."""
        events_log = self.registry.events
        applied = 0
        first = await events_log.first_id()
        if first is not None and self._cursor != START and id_after(first, self._cursor):
            # The stream was trimmed past our cursor: events are gone, so re-read everything.
            log.warning("epoch_view.events_trimmed", cursor=self._cursor, first=first)
            await self.refresh()
        while True:
            events = await events_log.read_after(self._cursor, count=100)
            if not events:
                return applied
            for event in events:
                await self._apply(ModelVersion(
                    model=event.model, version=event.version, epoch=event.epoch,
                    rolled_out_at=event.at,
                ))
                self._cursor = event.id
                applied += 1
                self.events_applied += 1

    async def catch_up(self, cursor: str) -> int:
        """Resume from a persisted cursor: replay events after it (listeners see each one)."""
        self._cursor = cursor
        return await self.poll()

    async def start(self, *, from_cursor: str | None = None) -> None:
        """Load the registry, then keep the view current in a background task."""
        if from_cursor is not None:
            await self.catch_up(from_cursor)
        else:
            # The cursor is taken before the full read, so no event falls between the two.
            self._cursor = await self.registry.events.last_id()
        await self.refresh()
        self.start_background()

    def start_background(self) -> None:
        """Start only the background loop (no initial load), e.g. when the registry was down
        at start-up: the loop keeps retrying, and reads fail closed until a refresh succeeds."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="epoch-view")

    async def stop(self) -> None:
        if self._task is not None:
            self._stopping = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def tick(self) -> None:
        """One step of the background loop: poll events, and re-read the registry when due."""
        await self.poll()
        if self._confirmed_at is None or (
            self._clock() - self._confirmed_at >= self.refresh_interval / 2
        ):
            await self.refresh()

    async def _run(self) -> None:
        backoff = self.poll_interval
        while not self._stopping:
            try:
                await self.tick()
                backoff = self.poll_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                task = asyncio.current_task()
                if self._stopping or (task is not None and task.cancelling()):
                    # NOTE: redis-py can turn a cancellation mid-command into a connection
                    # error; without this check the loop would swallow stop() and run forever.
                    raise asyncio.CancelledError from exc
                # Keep going: the read path fails closed on its own once the bound passes.
                log.warning("epoch_view.tick_failed", error=f"{type(exc).__name__}: {exc}")
                backoff = min(backoff * 2, max(self.poll_interval, self.refresh_interval / 4))
            await asyncio.sleep(backoff)

    def check_valid(self) -> None:
        """Assert the view's invariants."""
        for model, mv in self._versions.items():
            assert mv.model == model
            assert mv.epoch >= 0
        if self._confirmed_at is not None:
            assert self._confirmed_at <= self._clock()
        _id_key(self._cursor)
