"""The service's Prometheus metrics, on prometheus-client's default registry.

Other parts (the auditor, the engine, the stores) register theirs on the same default registry,
so ``GET /metrics`` shows them all. Metric objects are module singletons: creating an app twice
in one process (tests) reuses them instead of failing on duplicate names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Labelled children, memoised: the one idiom every part uses (defined beside the auditor's
# metrics, the lowest package that has any).
from audit.metrics import child as child

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5)

LOOKUPS = Counter("cachesvc_lookups", "Cache lookups by outcome.", ["outcome", "route"])
BYPASSES = Counter("cachesvc_bypasses", "Requests that bypassed the cache, by reason.",
                   ["reason"])
HITS = Counter("cachesvc_hits", "Cache hits served. Hit ratio of a tenant and model: hits / "
               "(hits + misses).", ["tenant", "model"])
MISSES = Counter("cachesvc_misses", "Cache misses (lookups that found no usable entry).",
                 ["tenant", "model"])
FILLS = Counter("cachesvc_fills", "Entries stored, by source.", ["source"])
FILL_SKIPS = Counter("cachesvc_fill_skips", "Responses not stored, by reason.", ["reason"])
LOOKUP_LATENCY = Histogram("cachesvc_lookup_seconds", "Time to look up and verify an entry.",
                           buckets=_LATENCY_BUCKETS)
UPSTREAM_LATENCY = Histogram("cachesvc_upstream_seconds", "Upstream call time (to first byte "
                             "for streams).", ["kind"], buckets=_LATENCY_BUCKETS + (5, 10, 30))
UPSTREAM_ERRORS = Counter("cachesvc_upstream_errors", "Upstream failures passed through: 5xx, "
                          "or 0 when it did not answer.", ["status"])
UPSTREAM_REFUSALS = Counter("cachesvc_upstream_refusals", "Requests the upstream refused as "
                            "the client's error (4xx), passed through.", ["status"])
STORE_ERRORS = Counter("cachesvc_store_errors", "Store calls that failed or timed out.",
                       ["op", "error"])
STORE_SKIPPED = Counter("cachesvc_store_skipped", "Store calls not made: breaker open.", ["op"])
BREAKER_STATE = Gauge("cachesvc_breaker_state", "Store circuit breaker: 0 closed, 1 half-open, "
                      "2 open.")
REJECTED_ENTRIES = Counter("cachesvc_rejected_entries", "Stored entries refused on read, by "
                           "reason (corrupt, scope, model, epoch, collision).", ["reason"])
COALESCED = Counter("cachesvc_coalesced", "Misses served by another request's fill.")
OBSERVER_ERRORS = Counter("cachesvc_observer_errors", "Observers that raised on observe().")

BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}


def count_upstream_error(status: int) -> None:
    """A 4xx is the client's mistake, not the upstream's: counted apart from failures."""
    (UPSTREAM_REFUSALS if 400 <= status < 500 else UPSTREAM_ERRORS).labels(str(status)).inc()


class _Live(Collector):
    """The embedded store's bytes and entries, read at scrape time from the running app's store.
    A Redis store's size is Redis' own (``INFO``), not read here. (The in-process engine's
    ``engine_*`` metrics are registered by the engine's own collector.)"""

    def __init__(self) -> None:
        self.store: Any = None

    def collect(self) -> Iterator[Any]:
        from cachesvc.store import EmbeddedStore

        store = self.store
        if isinstance(store, EmbeddedStore):
            yield GaugeMetricFamily("cachesvc_store_bytes", "Bytes held by the embedded store.",
                                    value=store.bytes_used)
            yield GaugeMetricFamily("cachesvc_store_entries", "Entries in the embedded store.",
                                    value=len(store))
            yield GaugeMetricFamily("cachesvc_store_max_bytes", "The embedded store's bound.",
                                    value=store.max_bytes)


LIVE = _Live()
REGISTRY.register(LIVE)


def watch_store(store: Any) -> None:
    """Export ``store``'s size (None: nothing) until the next call."""
    LIVE.store = store
