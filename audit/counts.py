"""The shadow auditor's counters, and the arithmetic they must keep."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ShadowCounts:
    """What happened to every event offered: each one is skipped (not sampled), enqueued,
    dropped (queue full) or abandoned (drawn, but its event could not be built); each one
    enqueued is eventually checked or failed (its conversion or a check raised)."""

    offered: int = 0
    skipped: int = 0
    enqueued: int = 0
    dropped: int = 0
    abandoned: int = 0
    checked: int = 0
    failed: int = 0
    findings: int = 0
    #: Samples whose recompute the budget refused (they still got every other check).
    recompute_skipped: int = 0
    #: CPU seconds the worker thread spent checking (what the auditor costs, read directly).
    worker_cpu_s: float = 0.0

    def check_valid(self) -> None:
        assert self.offered == self.skipped + self.enqueued + self.dropped + self.abandoned, (
            self.offered, self.skipped, self.enqueued, self.dropped, self.abandoned)
        assert self.checked + self.failed <= self.enqueued
        assert self.findings >= 0
