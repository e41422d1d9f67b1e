"""The shadow auditor the service runs, built from its ``[audit]`` settings."""

from __future__ import annotations

import random

from audit import FileJournal, Journal, ShadowAuditor, ShadowConfig
from audit.protocols import Oracle, RegistryView
from cachesvc.auditing.entries import EntryReader
from cachesvc.auditing.journals import findings_path_of, journal_for, make_recorder
from cachesvc.events import CacheEvent
from cachesvc.settings import Settings
from cachesvc.store.mac import EntryKeys


def canaries_of(settings: Settings) -> dict[str, list[str]]:
    return {t.id: list(t.canaries) for t in settings.tenants if t.canaries}


def build_shadow_auditor(
    settings: Settings,
    *,
    keys: EntryKeys,
    oracle: Oracle | None = None,
    registry_view: RegistryView | None = None,
    journal: Journal | None = None,
    rng: random.Random | None = None,
) -> ShadowAuditor[CacheEvent]:
    """The shadow auditor the service runs, from its ``[audit]`` settings. Not started."""
    a = settings.audit
    findings_path = findings_path_of(settings)
    if journal is None:
        journal = journal_for(settings.redis, findings_path)
    recorder = make_recorder(
        journal, fallback_path=None if isinstance(journal, FileJournal) else findings_path)
    grace = a.stale_grace_s
    if grace is None:
        grace = max(30.0, 2 * settings.cache.registry_refresh_s)
    config = ShadowConfig(
        sample_rate=a.sample_rate, fill_sample_rate=a.fill_sample_rate, queue_size=a.queue_size,
        stale_grace_s=grace, canaries=canaries_of(settings),
        recompute=oracle is not None and a.oracle != "none",
        recompute_budget=a.recompute_budget, recompute_burst_s=a.recompute_burst_s,
        batch_wait_s=a.batch_wait_s,
    )
    return ShadowAuditor(recorder=recorder, convert=EntryReader.of(settings, keys).sample,
                         config=config,
                         oracle=oracle if a.oracle != "none" else None, registry=registry_view,
                         rng=rng)
