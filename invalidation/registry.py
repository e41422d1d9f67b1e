"""The model registry: ``model -> current version -> epoch``.

Every rollout, a rollback to an earlier version included, gets a fresh epoch, so entries keyed
with an old epoch can never come back. Epochs only grow, and are at least the registry clock in
milliseconds: even a registry that lost its data (a Redis restarted without persistence) cannot
hand out an epoch it handed out before, while the clock moves forward.

There is no constant first epoch. A model never rolled out is at the registry's *genesis*
epoch, issued from the same counter the first time it is asked for: a registry that lost its
keys issues a new, larger genesis, so entries of unversioned models written before the loss are
never reachable again either.

A rollout writes the registry and appends its durable event (:mod:`invalidation.events`) in one
atomic step: a Lua script on keys that share one hash tag, so it runs on one Cluster slot.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

from invalidation.errors import InvalidModelNameError, UnknownModelError
from invalidation.events import EventLog, MemoryEventLog, RedisEventLog, _unavailable
from invalidation.types import ModelVersion, Rollout, RolloutEvent
from keying import escape_component

MAX_NAME = 256
#: Events kept in the stream (approximate trim). A replica further behind re-reads the registry.
DEFAULT_STREAM_MAXLEN = 10_000


def validate_name(field: str, value: object) -> str:
    """A model name or version: a non-empty string of at most 256 printable characters."""
    if not isinstance(value, str) or not value:
        raise InvalidModelNameError(field, f"{value!r} is not a non-empty string", "pass a name")
    if len(value) > MAX_NAME:
        raise InvalidModelNameError(
            field, f"is {len(value)} characters long", f"use at most {MAX_NAME}"
        )
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise InvalidModelNameError(
            field, "contains control or unassigned characters", "use printable characters only"
        )
    return value


@runtime_checkable
class ModelRegistry(Protocol):
    """Where the current version and epoch of every model live."""

    @property
    def events(self) -> EventLog:
        """The durable log every rollout is written to."""
        ...

    async def current(self, model: str) -> ModelVersion:
        """The model's current version; :class:`UnknownModelError` if never rolled out."""
        ...

    async def get(self, model: str) -> ModelVersion | None:
        """Like :meth:`current`, but None for an unknown model."""
        ...

    async def rollout(self, model: str, version: str, *, idempotent: bool = False,
                      only: Only = None) -> Rollout:
        """Make ``version`` current with a fresh epoch. With ``idempotent=True``, rolling out the
        version that is already current changes nothing (same epoch, no event).
        ``only="existing"``: an unknown model raises :class:`UnknownModelError` (a typo must not
        create a model). ``only="absent"``: a model that exists is left as it is, whatever its
        version (``changed`` is False); only a new one is created."""
        ...

    async def list(self) -> list[ModelVersion]:
        """Every model's current version, sorted by model name."""
        ...

    async def genesis(self) -> int:
        """The epoch of every model never rolled out: issued once from the epoch counter (so
        it is below every later rollout's epoch), and issued afresh if the registry lost it."""
        ...


#: Which models a rollout may touch: any, only one that exists, or only a new one.
Only = Literal["existing", "absent"] | None


def _unknown(model: str) -> UnknownModelError:
    return UnknownModelError(
        f"model {model!r} has no rollout; check the name, or create it with "
        f"`cachesvc models rollout {model} VERSION --create`"
    )


class EmbeddedRegistry:
    """An in-process registry (single replica, no Redis). ``clock`` is wall-clock seconds."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._models: dict[str, ModelVersion] = {}
        self._last_epoch = 0
        self._genesis: int | None = None
        self.events = MemoryEventLog()

    async def current(self, model: str) -> ModelVersion:
        mv = self._models.get(model)
        if mv is None:
            raise _unknown(model)
        return mv

    async def get(self, model: str) -> ModelVersion | None:
        return self._models.get(model)

    async def rollout(self, model: str, version: str, *, idempotent: bool = False,
                      only: Only = None) -> Rollout:
        validate_name("model", model)
        validate_name("version", version)
        previous = self._models.get(model)
        if previous is None and only == "existing":
            raise _unknown(model)
        if previous is not None and (only == "absent"
                                     or (idempotent and previous.version == version)):
            return Rollout(current=previous, previous=previous, changed=False, event_id=None)
        now = self._clock()
        epoch = self._next_epoch(now)
        mv = ModelVersion(model=model, version=version, epoch=epoch, rolled_out_at=now)
        self._models[model] = mv
        event_id = self.events.next_id()
        self.events.append(RolloutEvent(
            id=event_id, model=model, version=version, epoch=epoch,
            previous_epoch=None if previous is None else previous.epoch, at=now,
        ))
        return Rollout(current=mv, previous=previous, changed=True, event_id=event_id)

    async def list(self) -> list[ModelVersion]:
        return [self._models[m] for m in sorted(self._models)]

    async def genesis(self) -> int:
        if self._genesis is None:
            self._genesis = self._next_epoch(self._clock())
        return self._genesis

    def _next_epoch(self, now: float) -> int:
        self._last_epoch = max(self._last_epoch + 1, int(now * 1000))
        return self._last_epoch

    def check_valid(self) -> None:
        for model, mv in self._models.items():
            assert mv.model == model and 0 < mv.epoch <= self._last_epoch


# KEYS: genesis, epoch counter. The genesis epoch, issued from the counter if absent.
_GENESIS = """
local g = redis.call('GET', KEYS[1])
if g then return g end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counter = tonumber(redis.call('GET', KEYS[2]) or '0')
local epoch_s = string.format('%d', math.max(counter + 1, now_ms))
redis.call('SET', KEYS[2], epoch_s)
redis.call('SET', KEYS[1], epoch_s)
return epoch_s
"""

# KEYS: models hash, epoch counter, events stream. ARGV: model, version, idempotent, maxlen,
# only ('', 'existing' or 'absent'). The epoch is max(counter + 1, server time in ms): fresh
# even if the counter was lost.
_ROLLOUT = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local prev = ''
if not cur and ARGV[5] == 'existing' then
  return {-1, '', '', ''}
end
if cur then
  local d = cjson.decode(cur)
  prev = tostring(d.epoch)
  if ARGV[5] == 'absent' or (ARGV[3] == '1' and d.version == ARGV[2]) then
    return {0, cur, '', cur}
  end
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local counter = tonumber(redis.call('GET', KEYS[2]) or '0')
local epoch = math.max(counter + 1, now_ms)
local epoch_s = string.format('%d', epoch)
redis.call('SET', KEYS[2], epoch_s)
local at = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local val = '{"version":' .. cjson.encode(ARGV[2]) .. ',"epoch":' .. epoch_s
  .. ',"at":' .. at .. '}'
redis.call('HSET', KEYS[1], ARGV[1], val)
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*',
  'model', ARGV[1], 'version', ARGV[2], 'epoch', epoch_s, 'previous', prev, 'at', at)
return {1, val, id, cur or ''}
"""


class RedisRegistry:
    """The registry in Redis (standalone or Cluster). All keys share the hash tag
    ``{<namespace>-registry}``, so the rollout script touches a single slot."""

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = "llmc",
        stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
    ) -> None:
        self.client = client
        tag = "{" + escape_component(namespace) + "-registry}"
        self.models_key = f"llmc:{tag}:models"
        self.counter_key = f"llmc:{tag}:epoch"
        self.genesis_key = f"llmc:{tag}:genesis"
        self.events_key = f"llmc:{tag}:events"
        self.stream_maxlen = stream_maxlen
        self.events = RedisEventLog(client, self.events_key)
        self._script = client.register_script(_ROLLOUT)
        self._genesis = client.register_script(_GENESIS)

    @staticmethod
    def _parse(model: str, raw: Any) -> ModelVersion:
        d = json.loads(raw)
        return ModelVersion(
            model=model, version=d["version"], epoch=int(d["epoch"]),
            rolled_out_at=float(d.get("at", 0.0)),
        )

    async def get(self, model: str) -> ModelVersion | None:
        try:
            raw = await self.client.hget(self.models_key, model)
        except Exception as exc:
            raise _unavailable(exc) from exc
        return None if raw is None else self._parse(model, raw)

    async def current(self, model: str) -> ModelVersion:
        mv = await self.get(model)
        if mv is None:
            raise _unknown(model)
        return mv

    async def rollout(self, model: str, version: str, *, idempotent: bool = False,
                      only: Only = None) -> Rollout:
        validate_name("model", model)
        validate_name("version", version)
        try:
            changed, val, event_id, prev = await self._script(
                keys=[self.models_key, self.counter_key, self.events_key],
                args=[model, version, "1" if idempotent else "0", self.stream_maxlen, only or ""],
            )
        except Exception as exc:
            raise _unavailable(exc) from exc
        if changed == -1:
            raise _unknown(model)
        current = self._parse(model, val)
        previous = self._parse(model, prev) if prev else None
        return Rollout(
            current=current,
            previous=previous,
            changed=bool(changed),
            event_id=(event_id.decode() if isinstance(event_id, bytes) else event_id) or None,
        )

    async def list(self) -> list[ModelVersion]:
        try:
            raw = await self.client.hgetall(self.models_key)
        except Exception as exc:
            raise _unavailable(exc) from exc
        out = []
        for model, value in raw.items():
            name = model.decode() if isinstance(model, bytes) else model
            out.append(self._parse(name, value))
        return sorted(out, key=lambda mv: mv.model)

    async def genesis(self) -> int:
        try:
            return int(await self._genesis(keys=[self.genesis_key, self.counter_key]))
        except Exception as exc:
            raise _unavailable(exc) from exc
