"""The reference engine's Prometheus metrics, read from ``Engine.stats()`` at scrape time (so
they are never stale), for ``cachesvc engine serve`` and for the service when the engine runs in
process as its upstream."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from gpu_prefix.scheduler import Histogram


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    cumulative = 0
    buckets = []
    for bound, n in zip((*map(str, h.buckets), "+Inf"), h.counts, strict=True):
        cumulative += n
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.total)


class EngineCollector(Collector):
    """The engine's gauges, counters and histograms; ``engine`` may be swapped (tests build
    several services in one process, and the default registry takes a collector once)."""

    def __init__(self, engine: Any = None) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        engine = self.engine
        if engine is None:
            return
        s = engine.stats()
        gauges = {
            "engine_requests_running": ("Requests admitted and in flight (scheduled every step).",
                                        s.running),
            "engine_requests_queued": ("Requests waiting for admission (KV pool watermark or "
                                       "max_running).",
                                       s.queued),
            "engine_kv_pool_usage_ratio": ("Fraction of KV pool blocks in use (cached, pinned or "
                                           "private).", s.usage),
            "engine_kv_pool_used_bytes": ("Bytes of KV pool blocks in use.", s.used_bytes),
            "engine_kv_pool_capacity_bytes": ("KV pool size (preallocated).", s.capacity_bytes),
            "engine_kv_held_blocks": ("Blocks held by running requests (pinned or private): not "
                                      "evictable.",
                                      s.held_blocks),
            "engine_kv_limit_blocks": ("Blocks admission lets running requests hold (the high "
                                       "watermark).",
                                       s.limit_blocks),
            "engine_step_last_tokens": ("Tokens in the last step's packed batch.",
                                        s.last_step_tokens),
            "engine_model_epoch": ("Model epoch in the block hashes.", engine.model_epoch),
            "engine_kv_int8": ("1 while the KV pool stores INT8 (kv_dtype int8 and not turned "
                               "off).",
                               int(engine.kv_dtype == "int8")),
            "engine_kv_int8_disabled": ("1 once the drift guard turned this engine's INT8 KV off.",
                                        int(engine.int8_disabled_reason is not None)),
            "engine_kv_int8_full_layers": ("Layers the drift guard keeps in full precision in an "
                                           "INT8 pool.",
                                           len(engine.int8_full_layers)),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        drift = engine.last_drift
        if drift is not None:
            yield from _figure_families("engine_kv_drift", "Last drift audit",
                                        {"all": drift.overall, **drift.buckets})
        sampler = engine.drift_sampler
        if sampler is not None:
            yield from _sampler_metrics(sampler.stats())
        blocks = GaugeMetricFamily("engine_kv_blocks",
                                   "KV pool blocks by state: free; cached (indexed, "
                                   "evictable); pinned (indexed, used by a request); private (a "
                                   "request's own).",
                                   labels=["state"])
        for state, value in (("free", s.free_blocks), ("cached", s.cached_blocks),
                             ("pinned", s.pinned_blocks),
                             ("private", s.private_blocks)):
            blocks.add_metric([state], value)
        yield blocks
        counters = {
            "engine_prefix_hit_tokens": ("Prompt tokens served from cached KV blocks.",
                                         s.hit_tokens_total),
            "engine_prefix_query_tokens": ("Prompt tokens in full blocks looked up.",
                                           s.query_tokens_total),
            "engine_requests_admitted": ("Requests admitted.", s.admitted_total),
            "engine_requests_refused": ("Requests refused by admission control (retryable 503).",
                                        s.refused_total),
            "engine_requests_preempted": ("Running requests preempted for blocks (recomputed "
                                          "later).",
                                          s.preempted_total),
            "engine_requests_finished": ("Requests finished.", s.finished_total),
            "engine_steps": ("Scheduler steps (one packed forward each).", s.steps_total),
            "engine_step_tokens": ("Tokens run in scheduler steps (divide by engine_steps for "
                                   "tokens per step).",
                                   s.step_tokens_total),
            "engine_kv_evicted_blocks": ("KV blocks evicted (unpinned leaves, LRU).",
                                         s.evicted_blocks_total),
            "engine_kv_block_collisions": ("Block hash matches refused by verification.",
                                           s.collisions_total),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        yield _histogram("engine_step_seconds",
                         "Time of one scheduler step (forward, sampling excluded).",
                         s.step_time)
        yield _histogram("engine_ttft_seconds",
                         "Time from a request's arrival to its first token.", s.ttft)


def _sampler_metrics(st: Any) -> Iterator[Any]:
    """The drift sampler's counters and its running figures (``gpu_prefix.drift_sampler``)."""
    for name, doc, value in (
        ("engine_kv_drift_sampled",
         "Finished INT8 requests re-run in full precision by the drift sampler.",
         st.sampled),
        ("engine_kv_drift_sample_trips",
         "Times the drift sampler's running figures crossed the thresholds.",
         st.trips),
        ("engine_kv_drift_sample_tokens",
         "Tokens the drift sampler replayed (each run in INT8 and in full).",
         st.replay_tokens),
    ):
        yield CounterMetricFamily(name, doc, value=value)
    skipped = CounterMetricFamily("engine_kv_drift_sample_skipped",
                                  "Requests the drift sampler chose but did "
                                  "not re-run: over its token budget, or its queue full.",
                                  labels=["reason"])
    skipped.add_metric(["budget"], st.skipped_budget)
    skipped.add_metric(["queue"], st.skipped_queue)
    yield skipped
    yield GaugeMetricFamily("engine_kv_drift_sample_queued",
                            "Sampled requests waiting for their re-run.",
                            value=st.queued)
    yield from _figure_families("engine_kv_drift_sample", "Drift sampler, running", st.figures)


def _figure_families(prefix: str, what: str, figures: dict[str, Any]) -> Iterator[Any]:
    """Drift figures (``gpu_prefix.drift.Figures`` by position bucket) as one gauge family per
    figure, labelled by ``positions``: ``{prefix}_kld_mean``, ``_kld_p99``, ``_top1_agreement``."""
    for attr, doc in (
        ("kld_mean", "mean KLD of INT8 against full precision."),
        ("kld_p99", "p99 KLD of INT8 against full precision."),
        ("top1_agreement", "share of positions where INT8 keeps the full-precision top token."),
    ):
        family = GaugeMetricFamily(f"{prefix}_{attr}", f"{what}: {doc}", labels=["positions"])
        for bucket, f in figures.items():
            family.add_metric([bucket], getattr(f, attr))
        yield family


_default: EngineCollector | None = None
_lock = threading.Lock()


def register_default(engine: Any) -> None:
    """Show ``engine``'s metrics on the default registry (the service's ``GET /metrics``)."""
    global _default
    with _lock:
        if _default is None:
            _default = EngineCollector()
            REGISTRY.register(_default)
        _default.engine = engine


def engine_registry(engine: Any) -> CollectorRegistry:
    """A registry of its own for the engine's HTTP app."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    return registry
