"""One offline scan of a store, as ``cachesvc audit scan`` and ``POST /admin/scan`` run it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from audit import Journal, Recorder, Scanner, ScanResult
from audit.protocols import Oracle, RegistryReader
from cachesvc.auditing.entries import EntryReader, scan_items
from cachesvc.auditing.registry import registry_snapshot
from cachesvc.auditing.shadow import canaries_of
from cachesvc.settings import Settings
from cachesvc.store.base import ResponseStore
from cachesvc.store.mac import EntryKeys, key_id


async def run_scan(settings: Settings, store: ResponseStore, journal: Journal, *,
                   registry: RegistryReader | None, secret: bytes, target: str,
                   batch: int = 500, oracle: Oracle | None = None,
                   progress: Callable[[int], None] | None = None) -> ScanResult:
    """One offline scan of ``store``: the registry snapshot, every entry checked, findings
    recorded, the result saved to ``journal`` for reports. Shared by ``cachesvc audit scan``
    (Redis, from the CLI's process) and ``POST /admin/scan`` (any store, inside the service).
    ``secret`` is the service's: every entry's MAC is verified under it and the configured
    ``[cache] previous_secrets``, as the hit path does. ``registry=None`` skips the checks
    against the registry."""
    previous = [s.encode() for s in settings.cache.previous_secrets]
    reader = EntryReader.of(settings, EntryKeys(secret, previous))
    snapshot = await registry_snapshot(registry) if registry is not None else {}
    genesis = await registry.genesis() if registry is not None else None
    recorder = Recorder(journal)
    scanner = Scanner(recorder=recorder, registry=snapshot, canaries=canaries_of(settings),
                      check_registry=registry is not None, secret=secret, oracle=oracle,
                      previous_secrets={key_id(s).hex(): s for s in previous}, genesis=genesis,
                      target=target)
    try:
        result = await scanner.run(scan_items(store, reader, batch=batch), progress=progress)
        journal.save_result("scan", result.as_dict())
    finally:
        recorder.close()
    return result


def material_secret(settings: Settings) -> bytes | None:
    """The service's material-digest secret: the config's, else the one the service keeps in
    ``<state_dir>/secret`` (read only; a scan never creates one)."""
    if settings.cache.secret:
        return settings.cache.secret.encode()
    try:
        data = (Path(settings.state_dir) / "secret").read_bytes().strip()
    except OSError:
        return None
    return data if len(data) >= 32 else None
