"""The service's Prometheus metrics, on prometheus-client's default registry.

Other parts (the auditor, the engine, the stores) register theirs on the same default registry,
so ``GET /metrics`` shows them all. Metric objects are module singletons: creating an app twice
in one process (tests) reuses them instead of failing on duplicate names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5)

LOOKUPS = Counter("cachesvc_lookups", "Cache lookups by outcome.", ["outcome", "route"])
BYPASSES = Counter("cachesvc_bypasses", "Requests that bypassed the cache, by reason.",
                   ["reason"])
HITS = Counter("cachesvc_hits", "Cache hits served.", ["tenant"])
MISSES = Counter("cachesvc_misses", "Cache misses.", ["tenant"])
FILLS = Counter("cachesvc_fills", "Entries stored, by source.", ["source"])
FILL_SKIPS = Counter("cachesvc_fill_skips", "Responses not stored, by reason.", ["reason"])
LOOKUP_LATENCY = Histogram("cachesvc_lookup_seconds", "Time to look up and verify an entry.",
                           buckets=_LATENCY_BUCKETS)
UPSTREAM_LATENCY = Histogram("cachesvc_upstream_seconds", "Upstream call time (to first byte "
                             "for streams).", ["kind"], buckets=_LATENCY_BUCKETS + (5, 10, 30))
UPSTREAM_ERRORS = Counter("cachesvc_upstream_errors", "Upstream errors passed through.",
                          ["status"])
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


def child(metric: Counter, *labels: str) -> Counter:
    """``metric.labels(*labels)``, memoised: ``labels()`` costs more than the increment."""
    key = (id(metric), labels)
    found = _CHILDREN.get(key)
    if found is None:
        if len(_CHILDREN) > 10_000:  # tenants come from config, but stay bounded anyway
            _CHILDREN.clear()
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


_CHILDREN: dict[tuple[int, tuple[str, ...]], Counter] = {}
