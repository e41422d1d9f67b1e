"""What the service tells its observers (the shadow auditor) after every hit and every fill.

The service builds one :class:`CacheEvent` per served hit and per stored fill, and hands it to
each configured :class:`CacheObserver`. Observers run on the request path, so ``observe`` must
return at once (sample, enqueue, drop when full) and must not raise; the service guards every
call anyway, so a broken observer costs a log line and a metric, never a request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from keying import KeyResult, Scope

if TYPE_CHECKING:  # pragma: no cover - the envelope module belongs to the storage part
    from cachesvc.store.envelope import Entry

EventKind = Literal["hit", "fill"]


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheEvent:
    """One hit served or one fill stored, with everything needed to re-check it later.

    ``expected_*`` are what the model registry said when the request was keyed; a hit whose
    entry disagrees with them is stale. ``raw`` is the stored bytes exactly as read (hit) or
    written (fill), so an auditor can re-decode and re-verify the checksum itself.
    ``response`` is the JSON body served (non-streamed), ``chunks`` the SSE chunk objects served
    (streamed); exactly one of them is set. ``at`` is wall-clock seconds since the epoch.
    """

    kind: EventKind
    tenant: str
    scope: Scope
    request: Mapping[str, Any]
    key: KeyResult
    expected_model: str
    expected_version: str
    expected_epoch: int
    raw: bytes
    entry: Entry | None
    response: Mapping[str, Any] | None = None
    chunks: Sequence[Mapping[str, Any]] | None = None
    stream: bool = False
    at: float = 0.0
    #: Where the fill came from: "proxy" (this service called the upstream) or "cache_api"
    #: (a gateway stored through ``/v1/cache/store``). Empty for hits.
    source: str = ""

    @property
    def served(self) -> Mapping[str, Any] | Sequence[Mapping[str, Any]] | None:
        """The body or the chunks that went to (or came from) the client."""
        return self.chunks if self.stream else self.response


@runtime_checkable
class CacheObserver(Protocol):
    """Receives hits and fills. Runs on the request path: must not block and must not raise.

    The service asks :meth:`wants` first for each event, and builds the event only for the
    observers that said yes (a sampling observer makes its draw there, so the request path
    pays for an event only on a sample). When there is one observer, :meth:`pass_over` is
    asked after :meth:`wants`: that many following events of the kind are not offered to it
    at all (it counts them as skipped itself). An observer that takes every event subclasses
    :class:`EveryEvent`.
    """

    def wants(self, kind: EventKind) -> bool:
        """Whether the next event of ``kind`` should be built and handed to :meth:`observe`."""
        ...

    def pass_over(self, kind: EventKind) -> int:
        """How many following events of ``kind`` the service may skip without asking."""
        ...

    def observe(self, event: CacheEvent) -> None:
        """An event :meth:`wants` asked for."""
        ...

    def abandon(self, kind: EventKind) -> None:
        """An event :meth:`wants` asked for could not be built."""
        ...

    def rejected(self, event: CacheEvent) -> None:
        """An entry the service's own verification refused (it answered a miss), built as for
        a hit with the raw bytes read and no response served. Offered to every observer,
        whatever :meth:`wants` would say: a refusal is evidence, not a sample."""
        ...


class EveryEvent:
    """Base of an observer that takes every hit and fill (and ignores refusals): override
    :meth:`observe`."""

    def wants(self, kind: EventKind) -> bool:
        return True

    def pass_over(self, kind: EventKind) -> int:
        return 0

    def observe(self, event: CacheEvent) -> None:
        raise NotImplementedError

    def abandon(self, kind: EventKind) -> None:
        return None

    def rejected(self, event: CacheEvent) -> None:
        return None
