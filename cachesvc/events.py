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
    """Receives every hit and fill. Must not block and must not raise.

    Optionally ``wants(kind) -> bool``, asked first for each event: False and the event is not
    even built for this observer (a sampling observer makes its draw there, so the request
    path pays for the event only on a sample); ``abandon(kind)``, told when an event it
    wanted could not be built; and ``pass_over(kind) -> int``, asked after ``wants`` when it is
    the only observer: that many following events of ``kind`` are not offered to it at all
    (it counts them as skipped itself).
    """

    def observe(self, event: CacheEvent) -> None: ...
