"""The heap built at start-up, frozen out of the cyclic garbage collector.

A hit allocates a few hundred objects that live until its answer is sent. With tens of requests
in flight, every young collection finds some of them alive and promotes them; their count passes
CPython's rule for a full collection (a quarter of the old generation) about once a second under
load, and a full collection walks every object the process holds: some 130,000 after importing
FastAPI, pydantic and redis-py (millions with torch). On the 2-core bench machine each one
stopped the event loop for 80-90 ms, so every request in flight waited that long: it was the hit
path's whole p99 (75-96 ms against a 2.5 ms median, ``bench/service.py``).

:func:`freeze` moves every object alive at the end of start-up into CPython's permanent
generation, which collections skip: a full collection then walks only what was allocated since
(under two thousand objects at steady state, under 1 ms). The cost: a reference cycle among
those objects that becomes garbage later is not collected until :func:`thaw` (reference counting
still frees everything else); start-up objects mostly live as long as the process.
"""

from __future__ import annotations

import gc


def freeze() -> int:
    """Collect once, then freeze every object alive now; returns how many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> None:
    """Give the frozen objects back to the collector (at shutdown: a process that builds many
    apps, such as the test suite, must not keep each one's garbage)."""
    gc.unfreeze()
