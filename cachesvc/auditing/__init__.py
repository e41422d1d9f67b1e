"""Adapters between the auditor (``audit/``) and the service; the only place that knows both.

``audit`` works on its own plain types and talks through the protocols in
:mod:`audit.protocols`; each module here implements one seam of them for the service:

* :mod:`~cachesvc.auditing.entries`: stored bytes -> the auditor's entry facts and samples;
* :mod:`~cachesvc.auditing.observer`: the shadow auditor as the service's cache observer;
* :mod:`~cachesvc.auditing.registry`: the model registry, read from the worker and for scans;
* :mod:`~cachesvc.auditing.journals`: where findings go (beside the store);
* :mod:`~cachesvc.auditing.oracles`: recompute with the engine or an upstream;
* :mod:`~cachesvc.auditing.shadow`: the shadow auditor, built from ``[audit]``;
* :mod:`~cachesvc.auditing.scan`: one offline scan of a store;
* :mod:`~cachesvc.auditing.prober`: the timing audit's HTTP prober.
"""

from cachesvc.auditing.entries import EntryReader, facts_from_entry, scan_items
from cachesvc.auditing.journals import (
    default_findings_path,
    findings_path_of,
    journal_for,
    open_journal,
)
from cachesvc.auditing.observer import ShadowObserver
from cachesvc.auditing.oracles import EngineOracle, UpstreamOracle
from cachesvc.auditing.prober import HttpProber, discover_model
from cachesvc.auditing.registry import LoopRegistryView, registry_snapshot
from cachesvc.auditing.scan import material_secret, run_scan
from cachesvc.auditing.shadow import build_shadow_auditor, canaries_of

__all__ = [
    "EngineOracle",
    "EntryReader",
    "HttpProber",
    "LoopRegistryView",
    "ShadowObserver",
    "UpstreamOracle",
    "build_shadow_auditor",
    "canaries_of",
    "default_findings_path",
    "findings_path_of",
    "discover_model",
    "facts_from_entry",
    "journal_for",
    "material_secret",
    "open_journal",
    "registry_snapshot",
    "run_scan",
    "scan_items",
]
