"""Prometheus metrics of the auditor, on prometheus-client's default registry.

They are created once per process at import; the service's ``/metrics`` shows them.
"""

from __future__ import annotations

import functools
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

FINDINGS = Counter(
    "llmcache_audit_findings_total",
    "Audit findings recorded, by kind and by what produced them.",
    ["kind", "source"],
)
SAMPLES = Counter(
    "llmcache_audit_samples_total",
    "Hits and fills offered to the shadow auditor, by what happened to them "
    "(skipped: not sampled; queued; dropped: queue full; checked).",
    ["event", "outcome"],
)
CHECKS = Counter(
    "llmcache_audit_checks_total",
    "Shadow checks run, by check and result (pass, finding, undecided, error).",
    ["check", "result"],
)
WORKER_CPU = Counter(
    "llmcache_audit_worker_cpu_seconds_total",
    "CPU time of the shadow auditor's worker thread (all checks, recompute included; threads "
    "a forward pass starts on its own, such as torch's intra-op pool, are not counted).",
)
QUEUE_DEPTH = Gauge("llmcache_audit_queue_depth", "Samples waiting for the shadow auditor.")
CHECK_SECONDS = Histogram(
    "llmcache_audit_check_seconds",
    "Time the shadow auditor spends on one sample (all checks, recompute included).",
    buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0, 60.0),
)
SCANNED = Counter(
    "llmcache_audit_scanned_entries_total", "Entries walked by the offline scan.", ["outcome"]
)
UNRECORDED = Counter(
    "llmcache_audit_unrecorded_findings_total",
    "Findings the journal could not store yet (kept in memory and retried).",
)

M = TypeVar("M", bound=MetricWrapperBase)


@functools.lru_cache(maxsize=4096)
def child(metric: M, *labels: str) -> M:
    """``metric.labels(*labels)``, memoised: ``labels()`` takes a lock and builds a key on
    every call, which costs more than the increment. The one way this project caches labelled
    children (the service's metrics use it too); bounded, as label values come from config. The
    shadow auditor's request path binds its children through it once, per event kind."""
    return metric.labels(*labels)
