"""audit: the correctness and leak auditor.

* :mod:`audit.finding`: the typed finding record; :mod:`audit.journal`: where findings live
  durably (a file or a Redis stream); :mod:`audit.recorder`: record = journal + metrics + log.
* :mod:`audit.checks`: the invariants of an entry, as pure functions over :mod:`audit.facts`.
* :mod:`audit.shadow`: the shadow auditor (sampled hits and fills, checked off the hot path).
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
from audit.journal import FileJournal, Journal, RedisJournal
from audit.oracle import Oracle, Tolerance
from audit.recorder import Recorder
from audit.scan import Scanner, ScanResult
from audit.shadow import RegistryView, Sample, ShadowAuditor, ShadowConfig
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
