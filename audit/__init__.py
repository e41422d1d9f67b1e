"""audit: the correctness and leak auditor.

* :mod:`audit.finding`: the typed finding record; :mod:`audit.journal`: where findings live
  durably (a file or a Redis stream); :mod:`audit.recorder`: record = journal + metrics + log.
* :mod:`audit.checks`: the invariants of an entry, as pure functions over :mod:`audit.facts`.
* :mod:`audit.protocols`: every seam the auditor talks through (journal, oracle, registry
  view, timing prober).
* :mod:`audit.shadow`: the shadow auditor's queue and worker (sampled hits and fills, checked
  off the hot path); :mod:`audit.sampler` draws the samples, :mod:`audit.shadow_checks` checks
  one, :mod:`audit.budget` bounds the recompute, :mod:`audit.counts` keeps the counters,
  :mod:`audit.sample` and :mod:`audit.shadow_config` are its value types.
* :mod:`audit.scan`: the offline scan of every entry.
* :mod:`audit.oracle`: recompute and the tolerance for scored comparisons.
* :mod:`audit.timing`: the timing side-channel audit (interleaved trials, one-sided KS test).
* :mod:`audit.report`: JSON, Markdown and self-contained HTML reports.

Imports only ``keying`` (and ``invalidation`` / ``gpu_prefix`` types) of this project; the
adapters to the service's stores, events, settings and HTTP live in ``cachesvc.auditing``.
"""

from audit.answer import Answer, Choice
from audit.errors import (
    AuditConfigError,
    AuditError,
    FindingsLogError,
    OracleError,
    TimingProbeError,
)
from audit.facts import EntryFacts, KeyField, ModelState, UnreadableEntry
from audit.finding import FINDING_KINDS, Draft, EntryRef, Finding, FindingKind
from audit.journal import FileJournal, RedisJournal
from audit.oracle import Tolerance
from audit.protocols import Journal, Oracle, Prober, RegistryView
from audit.recorder import Recorder
from audit.sample import Sample
from audit.scan import Scanner, ScanResult
from audit.shadow import ShadowAuditor
from audit.shadow_config import ShadowConfig
from audit.timing import Level, TimingConfig, TimingResult, levels_for_keys, run_timing

__all__ = [
    "FINDING_KINDS",
    "Answer",
    "AuditConfigError",
    "AuditError",
    "Choice",
    "Draft",
    "EntryFacts",
    "EntryRef",
    "FileJournal",
    "Finding",
    "FindingKind",
    "FindingsLogError",
    "Journal",
    "KeyField",
    "Level",
    "ModelState",
    "Oracle",
    "Prober",
    "OracleError",
    "Recorder",
    "RedisJournal",
    "Sample",
    "ScanResult",
    "Scanner",
    "ShadowAuditor",
    "ShadowConfig",
    "RegistryView",
    "TimingConfig",
    "TimingProbeError",
    "TimingResult",
    "Tolerance",
    "UnreadableEntry",
    "levels_for_keys",
    "run_timing",
]
