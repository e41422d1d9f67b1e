"""The shadow auditor's settings (the service's ``[audit]`` section), checked on creation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from audit.errors import AuditConfigError
from audit.oracle import Tolerance


@dataclass(frozen=True, kw_only=True, slots=True)
class ShadowConfig:
    """Sampling and checking settings (the service's ``[audit]`` section)."""

    sample_rate: float = 0.01
    fill_sample_rate: float = 0.01
    queue_size: int = 1024
    stale_grace_s: float = 30.0
    recompute: bool = True
    #: Share of one core's wall time the recompute may use (1.0: no limit). Recomputing is the
    #: one expensive check (a model forward pass on the service's own machine); over budget a
    #: sample still gets every other check and the recompute is counted as skipped. What it
    #: costs against what sampling costs: ``python bench/audit.py``.
    recompute_budget: float = 0.01
    #: Most seconds of recompute that can be banked and spent at once (the bucket's size).
    recompute_burst_s: float = 2.0
    #: The worker sleeps this long after a sample arrives and then checks all that are queued,
    #: trading a little delay in findings for far fewer thread switches on the request path.
    batch_wait_s: float = 0.05
    tolerance: Tolerance = field(default_factory=Tolerance)
    canaries: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("sample_rate", "fill_sample_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(
                value, (int, float)) or not 0 <= value <= 1:
                raise AuditConfigError(f"audit.{name}", f"{value!r} is not a fraction",
                                       "use a number from 0 (off) to 1 (every event), e.g. 0.01")
        if isinstance(self.queue_size, bool) or not isinstance(
            self.queue_size, int) or self.queue_size < 1:
            raise AuditConfigError("audit.queue_size", f"{self.queue_size!r} is not >= 1",
                                   "use a positive number of samples, e.g. 1024")
        if not 0 < self.recompute_budget <= 1:
            raise AuditConfigError("audit.recompute_budget",
                                   f"{self.recompute_budget!r} is not in (0, 1]",
                                   "use the share of one core the recompute may use, e.g. 0.02")
        if not self.recompute_burst_s > 0:  # 0 could never bank credit: no recompute at all
            raise AuditConfigError("audit.recompute_burst_s",
                                   f"{self.recompute_burst_s!r} is not > 0",
                                   "use a number of seconds, e.g. 2")
        if not 0 <= self.batch_wait_s <= 10:
            raise AuditConfigError("audit.batch_wait_s", f"{self.batch_wait_s!r} is not in [0, 10]",
                                   "use a few hundredths of a second, e.g. 0.05 (0: no batching)")
        if not self.stale_grace_s >= 0:
            raise AuditConfigError("audit.stale_grace_s", f"{self.stale_grace_s!r} is not >= 0",
                                   "use the registry refresh bound in seconds, e.g. 30")

    def rate(self, kind: str) -> float:
        """The sample rate of events of ``kind`` (``hit`` or ``fill``)."""
        return self.sample_rate if kind == "hit" else self.fill_sample_rate
