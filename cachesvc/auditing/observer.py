"""The shadow auditor as the service's cache observer."""

from __future__ import annotations

from audit import ShadowAuditor
from cachesvc.events import CacheEvent, EventKind


class ShadowObserver:
    """The service's :class:`~cachesvc.events.CacheObserver`: hands events to the auditor."""

    def __init__(self, auditor: ShadowAuditor[CacheEvent]) -> None:
        self.auditor = auditor
        #: ``wants(kind)``: the sampling draw for one event (the auditor's own, bound once: it
        #: runs on every hit it is asked about). True when it is a sample, so the service
        #: builds the event (and calls :meth:`observe`) only for the ones checked.
        self.wants = auditor.draw
        #: ``pass_over(kind)``: how many following events the service may count down itself.
        self.pass_over = auditor.pass_over

    def observe(self, event: CacheEvent) -> None:
        """An event that :meth:`wants` drew as a sample: queue it (never blocks)."""
        self.auditor.enqueue(event, event.kind)

    def abandon(self, kind: EventKind) -> None:
        """A drawn sample whose event could not be built."""
        self.auditor.abandon()

    def rejected(self, event: CacheEvent) -> None:
        """An entry the service's own verification refused (it answered a miss): always checked,
        so the refusal becomes a durable finding with its evidence. ``event`` is built as for a
        hit, with the raw bytes read and no response served. Never blocks, never raises."""
        self.auditor.offer(event, force=True)
