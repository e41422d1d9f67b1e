"""The offline scan: every entry of every node, every invariant checkable without the request.

The scan reads entries through the service's adapter (decoded into :class:`EntryFacts`, or an
:class:`UnreadableEntry` when the codec refused the bytes), checks each with
:func:`audit.checks.check_stored` against one snapshot of the registry taken at the start, and
records what it finds. Its result (counts per outcome, per node and per kind, the reclaimable
old-epoch entries, the finding ids) is saved to the journal for reports.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keying.framing import DEFAULT_MATERIAL_SECRET

from audit import metrics
from audit.checks import check_stored, check_unreadable
from audit.facts import EntryFacts, ModelState, UnreadableEntry
from audit.finding import EntryRef, Finding
from audit.recorder import Recorder

ScanItem = EntryFacts | UnreadableEntry


@dataclass(frozen=True, kw_only=True, slots=True)
class ScanResult:
    """What one scan saw and found."""

    started_at: float
    finished_at: float
    entries: int
    clean: int
    unreadable: int
    reclaimable: int
    findings_by_kind: Mapping[str, int]
    entries_by_node: Mapping[str, int]
    finding_ids: Sequence[str]
    material_checked: int
    registry: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def findings(self) -> int:
        return sum(self.findings_by_kind.values())

    @property
    def ok(self) -> bool:
        return self.findings == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "entries": self.entries,
            "clean": self.clean,
            "unreadable": self.unreadable,
            "reclaimable": self.reclaimable,
            "findings": self.findings,
            "findings_by_kind": dict(self.findings_by_kind),
            "entries_by_node": dict(self.entries_by_node),
            "finding_ids": list(self.finding_ids),
            "material_checked": self.material_checked,
            "registry": {k: dict(v) for k, v in self.registry.items()},
        }


class Scanner:
    """Walks entries and records findings. One instance per scan."""

    def __init__(
        self,
        *,
        recorder: Recorder,
        registry: Mapping[str, ModelState],
        canaries: Mapping[str, Sequence[str]] | None = None,
        secret: bytes = DEFAULT_MATERIAL_SECRET,
        clock: Callable[[], float] = time.time,
        check_registry: bool = True,
    ) -> None:
        """``check_registry=False`` when no registry is reachable: epoch and version checks
        against it are skipped (placement, material, canary and decode checks still run)."""
        self.check_registry = check_registry
        self.recorder = recorder
        self.registry = dict(registry)
        self.canaries = dict(canaries or {})
        self.secret = secret
        self.clock = clock

    def check(self, item: ScanItem) -> list[Finding]:
        """Check one entry; returns its findings (recorded by :meth:`run`)."""
        now = self.clock()
        if isinstance(item, UnreadableEntry):
            drafts = check_unreadable(item)
            ref = EntryRef(storage_key=item.storage_key, node=item.node)
        else:
            drafts = check_stored(
                item, current=self.registry.get(item.model), canaries=self.canaries,
                secret=self.secret, check_registry_state=self.check_registry,
            )
            ref = EntryRef(
                storage_key=item.storage_key, node=item.node,
                digest=item.digest.hex() if item.digest is not None else None,
                scope=item.scope.label, model=item.model, epoch=item.epoch,
            )
        return [d.stamp(source="scan", entry=ref, at=now) for d in drafts]

    async def run(
        self,
        items: AsyncIterable[ScanItem] | Iterable[ScanItem],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> ScanResult:
        """Check every item; ``progress(n)`` is called after each with the count so far."""
        started = self.clock()
        entries = clean = unreadable = reclaimable = material = 0
        by_kind: Counter[str] = Counter()
        by_node: Counter[str] = Counter()
        ids: list[str] = []

        def one(item: ScanItem) -> None:
            nonlocal entries, clean, unreadable, reclaimable, material
            entries += 1
            by_node[item.node or "-"] += 1
            found = self.check(item)
            if isinstance(item, UnreadableEntry):
                unreadable += 1
            else:
                if item.material is not None:
                    material += 1
                current = self.registry.get(item.model)
                if current is not None and item.epoch < current.epoch:
                    reclaimable += 1
            for finding in found:
                self.recorder.record(finding)
                by_kind[finding.kind] += 1
                ids.append(finding.id)
            metrics.SCANNED.labels(outcome="finding" if found else "clean").inc()
            if not found:
                clean += 1
            if progress is not None:
                progress(entries)

        if isinstance(items, AsyncIterable):
            async for item in items:
                one(item)
        else:
            for item in items:
                one(item)
        self.recorder.flush()
        return ScanResult(
            started_at=started, finished_at=self.clock(), entries=entries, clean=clean,
            unreadable=unreadable, reclaimable=reclaimable, findings_by_kind=dict(by_kind),
            entries_by_node=dict(by_node), finding_ids=ids, material_checked=material,
            registry={m: {"version": s.version, "epoch": s.epoch} for m, s in self.registry.items()},
        )
