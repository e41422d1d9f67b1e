"""Handing the cache's events to its observers: who wants one, and delivery that never fails a
request (see :class:`~cachesvc.events.CacheObserver` for what an observer promises)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from cachesvc import metrics
from cachesvc.events import CacheObserver, EventKind

log = structlog.get_logger()


class Fanout:
    """Which observers take the next event of a kind, with one observer's ``pass_over``
    promises counted down here, so a skipped hit calls no observer at all."""

    def __init__(self) -> None:
        #: Events of each kind the one observer has said it will pass over.
        self._passing: dict[str, int] = {}
        self._passing_for: Sequence[CacheObserver] | None = None

    def wanting(self, everyone: Sequence[CacheObserver], kind: EventKind
                ) -> Sequence[CacheObserver]:
        """The observers whose ``wants(kind)`` said yes (the event is built only for them)."""
        if not everyone:
            return ()
        if self._passing_for is not everyone:  # observers replaced: forget their promises
            self._passing_for, self._passing = everyone, {}
        left = self._passing.get(kind, 0)
        if left > 0:
            # NOTE: a skipped hit costs this much and no more: a sampling observer's draw on
            # every hit is a measurable share of hit throughput (``python bench/audit.py``).
            self._passing[kind] = left - 1
            return ()
        wanting = [o for o in everyone if o.wants(kind)]
        if len(everyone) == 1:
            self._passing[kind] = everyone[0].pass_over(kind)
        return wanting


def build_failed(wanted_by: Sequence[CacheObserver], kind: EventKind) -> None:
    """An event could not be built: counted and logged, and the observers that wanted it are
    told (``abandon``), so a sampling observer accounts for the sample it drew."""
    metrics.OBSERVER_ERRORS.inc()
    log.exception("observer_event_failed")
    deliver(wanted_by, lambda o: o.abandon(kind))


def deliver(observers: Sequence[CacheObserver], call: Callable[[CacheObserver], None]) -> None:
    """``call(observer)`` on each; an observer must never fail a request."""
    for obs in observers:
        try:
            call(obs)
        except Exception as exc:  # noqa: BLE001
            metrics.OBSERVER_ERRORS.inc()
            log.warning("observer_failed", observer=type(obs).__name__,
                        error=f"{type(exc).__name__}: {str(exc)[:200]}")


__all__ = ["Fanout", "build_failed", "deliver"]
