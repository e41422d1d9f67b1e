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

import structlog

from audit import metrics
from audit.checks import check_stored, check_unreadable
from audit.facts import EntryFacts, ModelState, UnreadableEntry
from audit.finding import Draft, EntryRef, Finding, new_run_id
from audit.oracle import Tolerance, recompute
from audit.protocols import Oracle
from audit.recorder import Recorder
from keying import InvalidMaterialError, rebuild_key
from keying.framing import DEFAULT_MATERIAL_SECRET

log = structlog.get_logger("audit.scan")

#: The version the service reports for a model with no rollout (cachesvc.models.UNVERSIONED).
UNVERSIONED = "unversioned"

ScanItem = EntryFacts | UnreadableEntry


@dataclass(frozen=True, kw_only=True, slots=True)
class ScanResult:
    """What one scan saw and found. ``run_id`` and ``target`` say which run and which store a
    report shows; ``by_tenant_model`` counts entries and bad entries per ``tenant|model``."""

    run_id: str
    target: str

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
    #: Recompute outcomes (``pass``, ``finding``, ``undecided``, ``error`` and the reasons an
    #: entry was not recomputed) when the scan ran with an oracle; empty otherwise.
    recomputed: Mapping[str, int] = field(default_factory=dict)
    #: False when the service's secret was not known, so material digests were not recomputed.
    material_digest_checked: bool = True
    registry_checked: bool = True
    by_tenant_model: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @property
    def findings(self) -> int:
        return sum(self.findings_by_kind.values())

    @property
    def ok(self) -> bool:
        return self.findings == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "target": self.target,
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
            "material_digest_checked": self.material_digest_checked,
            "registry_checked": self.registry_checked,
            "by_tenant_model": {k: dict(v) for k, v in self.by_tenant_model.items()},
            "recomputed": dict(self.recomputed),
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
        secret: bytes | None = DEFAULT_MATERIAL_SECRET,
        clock: Callable[[], float] = time.time,
        check_registry: bool = True,
        oracle: Oracle | None = None,
        tolerance: Tolerance | None = None,
        previous_secrets: Mapping[str, bytes] | None = None,
        genesis: int | None = None,
        target: str = "-",
        run_id: str | None = None,
    ) -> None:
        """``check_registry=False`` when no registry is reachable: epoch and version checks
        against it are skipped (placement, material, canary and decode checks still run).
        ``secret=None`` when the service's secret is not known: material digests are not
        recomputed. With an ``oracle``, every entry of a current epoch that carries its key
        material and passed every other check is recomputed from the request read back out of
        that material (:func:`audit.oracle.recompute`): this is what finds a wrong answer
        stored under a valid key. ``previous_secrets`` (key id hex -> secret) key the material
        digests of entries signed under a rotated-out secret. ``genesis``: the registry's
        epoch for models it has no rollout of (they are served at it, as ``unversioned``)."""
        self.check_registry = check_registry
        self.target = target
        self.run_id = run_id or new_run_id()
        self.oracle = oracle
        self.tolerance = tolerance or Tolerance()
        self.recomputed: Counter[str] = Counter()
        self.recorder = recorder
        self.registry = dict(registry)
        self.canaries = dict(canaries or {})
        self.secret = secret
        self.previous_secrets = dict(previous_secrets or {})
        self.genesis = genesis
        self.clock = clock

    def check(self, item: ScanItem) -> list[Finding]:
        """Check one entry; returns its findings (recorded by :meth:`run`)."""
        now = self.clock()
        if isinstance(item, UnreadableEntry):
            drafts = check_unreadable(item)
            ref = EntryRef(storage_key=item.storage_key, node=item.node)
        else:
            drafts = check_stored(
                item, current=self._current(item.model), canaries=self.canaries,
                secret=self.previous_secrets.get(item.key_id or "", self.secret),
                check_registry_state=self.check_registry,
            )
            if self.oracle is not None:
                outcome, draft = self._recompute(item, clean=not drafts)
                self.recomputed[outcome] += 1
                metrics.CHECKS.labels(check="scan_recompute", result=outcome).inc()
                if draft is not None:
                    drafts.append(draft)
            ref = EntryRef(
                storage_key=item.storage_key, node=item.node,
                digest=item.digest.hex() if item.digest is not None else None,
                scope=item.scope.label, model=item.model, epoch=item.epoch,
            )
        return [d.stamp(source="scan", entry=ref, at=now) for d in drafts]

    def _current(self, model: str) -> ModelState | None:
        """The registry's state of ``model``; the genesis epoch for one never rolled out."""
        state = self.registry.get(model)
        if state is None and self.genesis is not None:
            return ModelState(model=model, version=UNVERSIONED, epoch=self.genesis)
        return state

    def _recompute(self, item: EntryFacts, *, clean: bool) -> tuple[str, Draft | None]:
        """Recompute one entry's answer; returns the outcome (for the counts) and a finding."""
        assert self.oracle is not None
        if not clean:
            return "skipped_other_finding", None
        if item.material is None:
            return "skipped_no_material", None
        current = self._current(item.model)
        if self.check_registry and (current is None or item.epoch != current.epoch):
            # NOTE: the oracle is the current model; an older epoch's answers may differ from it
            # rightly, and no lookup reaches them.
            return "skipped_old_epoch", None
        try:
            key = rebuild_key(item.material)  # only its request is used: any secret will do
        except InvalidMaterialError as exc:
            log.info("audit.scan.not_rekeyable", storage_key=item.storage_key, error=str(exc))
            return "undecided", None
        kind = key.canonical.kind
        if kind not in ("chat", "completion"):
            return "undecided", None
        # The minimal body keys the same as the stored material (a keying property test shows
        # it) and is what an upstream accepts; unkeyed fields cannot change the answer.
        request = key.canonical.body(minimal=True)
        out = recompute(self.oracle, request, kind, item.answer,
                        deterministic=key.cacheability.reproducible,
                        tenant=key.scope.tenant or "public", tolerance=self.tolerance)
        if out.verdict == "error":
            log.warning("audit.scan.oracle_failed", storage_key=item.storage_key, error=out.error)
        return out.verdict, out.draft

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
        per_tm: dict[str, Counter[str]] = {}

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
                current = self._current(item.model)
                if current is not None and item.epoch < current.epoch:
                    reclaimable += 1
            for finding in found:
                self.recorder.record(finding)
                by_kind[finding.kind] += 1
                ids.append(finding.id)
            metrics.SCANNED.labels(outcome="finding" if found else "clean").inc()
            if not found:
                clean += 1
            if not isinstance(item, UnreadableEntry):
                tm = per_tm.setdefault(f"{item.scope.tenant or 'public'}|{item.model}", Counter())
                tm["entries"] += 1
                tm["bad"] += bool(found)
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
            run_id=self.run_id, target=self.target,
            by_tenant_model={k: {"entries": c["entries"], "bad": c["bad"]}
                             for k, c in sorted(per_tm.items())},
            registry_checked=self.check_registry,
            started_at=started, finished_at=self.clock(), entries=entries, clean=clean,
            unreadable=unreadable, reclaimable=reclaimable, findings_by_kind=dict(by_kind),
            entries_by_node=dict(by_node), finding_ids=ids, material_checked=material,
            registry={
                m: {"version": s.version, "epoch": s.epoch} for m, s in self.registry.items()},
            recomputed=dict(self.recomputed), material_digest_checked=self.secret is not None,
        )
