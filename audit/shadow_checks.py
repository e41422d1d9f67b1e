"""Every check the shadow auditor runs on one sample.

1. provenance against the request and the registry view it was served under (scope, model,
   epoch, version, digest, material digest), and that the served answer is the stored one;
2. the registry now: serving an epoch the registry had replaced more than ``stale_grace_s``
   before the hit is ``stale`` (a replica that missed a rollout);
3. canaries: another tenant's canary in the answer;
4. recompute through the oracle, within its CPU budget: exact for deterministic requests on an
   exact oracle, teacher-forced scoring otherwise (tolerance in :mod:`audit.oracle`).
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from audit import metrics
from audit.answer import Answer
from audit.budget import TokenBucket
from audit.checks import check_canaries, check_served, check_unreadable
from audit.counts import ShadowCounts
from audit.facts import EntryFacts, UnreadableEntry
from audit.finding import Draft, Finding
from audit.oracle import recompute
from audit.protocols import Oracle, RegistryView
from audit.sample import Sample
from audit.shadow_config import ShadowConfig

log = structlog.get_logger("audit.shadow")


class SampleChecker:
    """Runs every check on a :class:`Sample` and returns its findings (not yet recorded).

    ``clock`` is wall time (when a finding happened, how long an epoch was known); ``timer``
    is monotonic (the recompute budget)."""

    def __init__(self, config: ShadowConfig, counts: ShadowCounts, *,
                 oracle: Oracle | None, registry: RegistryView | None,
                 clock: Callable[[], float], timer: Callable[[], float]) -> None:
        self.config = config
        self._counts = counts
        self._oracle = oracle
        self._registry = registry
        self._clock = clock
        self._timer = timer
        #: Recompute seconds that may be spent (see ``ShadowConfig.recompute_budget``).
        self.budget = TokenBucket(burst=config.recompute_burst_s, now=timer())
        self._first_seen: dict[tuple[str, int], float] = {}

    def check(self, sample: Sample) -> list[Finding]:
        """Every check on one sample; returns the findings (not yet recorded)."""
        drafts: list[Draft] = []
        entry = sample.entry
        if isinstance(entry, UnreadableEntry):
            drafts += _counted("decode", check_unreadable(entry))
        elif isinstance(entry, EntryFacts):
            drafts += _counted("provenance", check_served(
                entry, key=sample.key, scope=sample.scope,
                expected_model=sample.expected.model, expected_version=sample.expected.version,
                expected_epoch=sample.expected.epoch, served=sample.served,
            ))
            drafts += _counted("registry", self._check_registry(sample, entry))
        answer = sample.served if sample.served is not None else (
            entry.answer if isinstance(entry, EntryFacts) else None)
        if answer is not None and self.config.canaries:
            drafts += _counted("canary", check_canaries(
                answer.text, owner=sample.scope, canaries=self.config.canaries))
        if answer is not None and self.config.recompute and self._oracle is not None:
            draft = self._recompute_within_budget(sample, answer)
            if draft is not None:
                drafts.append(draft)
        ref, now = sample.ref(), self._clock()
        return [d.stamp(source=sample.event, entry=ref, at=now) for d in _dedupe(drafts)]

    def _check_registry(self, sample: Sample, entry: EntryFacts) -> list[Draft]:
        if self._registry is None:
            return []
        try:
            state = self._registry.current(entry.model)
        except Exception as exc:  # noqa: BLE001 - an unreadable registry skips this check, counted as an error
            log.warning("audit.shadow.registry_unavailable", error=repr(exc))
            metrics.child(metrics.CHECKS, "registry", "error").inc()
            return []
        if state is None:
            return []
        seen = self._first_seen.setdefault((state.model, state.epoch), self._clock())
        # NOTE: ``seen`` is when *this auditor* first saw the epoch, never earlier than the real
        # rollout, so the test below can only under-report: a hit is flagged only when the newer
        # epoch was known for longer than the grace before the hit was served.
        if entry.epoch < state.epoch and sample.at - seen > self.config.stale_grace_s:
            return [Draft(kind="stale", summary="served an epoch the registry had replaced",
                          evidence={"entry_epoch": entry.epoch, "registry_epoch": state.epoch,
                                    "replaced_for_s": round(sample.at - seen, 3),
                                    "grace_s": self.config.stale_grace_s})]
        return []

    def _recompute_within_budget(self, sample: Sample, cached: Answer) -> Draft | None:
        c = self.config
        now = self._timer()
        if c.recompute_budget < 1 and not self.budget.refill(
                rate=c.recompute_budget, burst=c.recompute_burst_s, now=now):
            self._counts.recompute_skipped += 1
            metrics.child(metrics.CHECKS, "recompute", "skipped_budget").inc()
            return None
        try:
            return self._recompute(sample, cached)
        finally:
            self.budget.spend(self._timer() - now)

    def _recompute(self, sample: Sample, cached: Answer) -> Draft | None:
        assert self._oracle is not None
        kind = sample.key.canonical.kind
        if kind not in ("chat", "completion"):
            metrics.child(metrics.CHECKS, "recompute", "undecided").inc()
            return None
        out = recompute(self._oracle, sample.request, kind, cached,
                        deterministic=sample.key.cacheability.reproducible, tenant=sample.tenant,
                        tolerance=self.config.tolerance)
        if out.verdict == "error":
            log.warning("audit.shadow.oracle_failed", error=out.error)
            metrics.child(metrics.CHECKS, "recompute", "error").inc()
            return None
        metrics.child(metrics.CHECKS, f"recompute_{out.check}", out.verdict).inc()
        return out.draft


def _counted(check: str, drafts: list[Draft]) -> list[Draft]:
    metrics.child(metrics.CHECKS, check, "finding" if drafts else "pass").inc()
    return drafts


def _dedupe(drafts: list[Draft]) -> list[Draft]:
    seen: set[tuple[str, str]] = set()
    out = []
    for d in drafts:
        if (d.kind, d.summary) not in seen:
            seen.add((d.kind, d.summary))
            out.append(d)
    return out
