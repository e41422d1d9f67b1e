"""The INT8 KV drift audit as findings: runs the engine's drift guard (``gpu_prefix.drift``) and,
when drift is over the model's thresholds (so the guard turned INT8 off), records a ``drift``
finding with the evidence; the report is kept as the journal's ``drift`` result for
``cachesvc audit report``. The engine's background drift sampler (``gpu_prefix.drift_sampler``)
records its trips the same way (:func:`trip_recorder`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from audit.finding import EntryRef, Finding, int8_off_where
from audit.protocols import Journal
from audit.recorder import Recorder
from gpu_prefix.drift import DriftReport, DriftThresholds, guard


def drift_finding(report: DriftReport, *, epoch: int | None, at: float) -> Finding:
    """The finding for a report over its thresholds: the figures, not the text."""
    evidence: dict[str, Any] = {
        "kld_mean": report.overall.kld_mean, "kld_p99": report.overall.kld_p99,
        "top1_agreement": report.overall.top1_agreement,
        "first_divergence_median": report.first_divergence_median,
        "exceeded": list(report.exceeded), "prompts": report.prompts,
        "max_tokens": report.max_tokens,
        "via": report.source, "int8_off": report.action or "model",
    }
    if report.layers:
        worst = max(report.layers, key=lambda e: max(e.k_rel_error, e.v_rel_error))
        evidence.update(worst_layer=worst.layer, worst_layer_k_rel_error=worst.k_rel_error,
                        worst_layer_v_rel_error=worst.v_rel_error)
    where = int8_off_where(report.action)
    via = " (background sampler)" if report.source == "sampler" else ""
    return Finding(kind="drift", source="drift", entry=EntryRef(model=report.model, epoch=epoch),
                   evidence=evidence,
                   at=at,
                   summary=f"INT8 KV drift over thresholds{via}, INT8 turned "
                           f"off{' ' + where if where else ''}: "
                   f"{'; '.join(report.exceeded)}")


def trip_recorder(recorder: Recorder, engine: Any) -> Callable[[DriftReport], None]:
    """What the engine's drift sampler calls on a trip: record it as a ``drift`` finding."""

    def on_trip(report: DriftReport) -> None:
        _record(recorder, engine, report)

    return on_trip


def _record(recorder: Recorder, engine: Any, report: DriftReport) -> None:
    """Record ``report`` as a ``drift`` finding at ``engine``'s model epoch, now."""
    recorder.record(drift_finding(report, epoch=engine.model_epoch, at=time.time()))


def run_drift_audit(engine: Any, prompts: Sequence[Sequence[int]], *, max_tokens: int,
                    recorder: Recorder | None = None, journal: Journal | None = None,
                    thresholds: DriftThresholds | None = None,
                    per_layer: bool = True) -> DriftReport:
    """Measure ``engine``'s INT8 drift and guard it; record a finding when it is turned off."""
    report = guard(engine, prompts, max_tokens=max_tokens, thresholds=thresholds,
                   per_layer=per_layer)
    if report.exceeded and recorder is not None:
        _record(recorder, engine, report)
    if journal is not None:
        journal.save_result("drift", {**report.as_dict(), "at": time.time(),
                                      "int8_disabled": engine.kv_dtype != "int8",
                                      "int8_full_layers": sorted(engine.int8_full_layers)})
    return report
