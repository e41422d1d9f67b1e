"""Records findings: into the durable journal, into metrics, into the structured log.

If the journal fails (Redis down, disk full) the finding is kept in memory and retried on the
next record and on ``flush``; at ``close`` whatever still cannot be stored goes to the fallback
file journal when one is configured, and is logged in full otherwise. A normal stop never
loses a finding.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import structlog

from audit import metrics
from audit.errors import FindingsLogError
from audit.finding import Finding
from audit.protocols import Journal

log = structlog.get_logger("audit")


class Recorder:
    """Thread-safe sink for findings; ``record`` never raises."""

    def __init__(
        self,
        journal: Journal,
        *,
        fallback: Journal | None = None,
        max_pending: int = 100_000,
        on_finding: Callable[[Finding], None] | None = None,
    ) -> None:
        self.journal = journal
        self._fallback = fallback
        self._pending: deque[Finding] = deque(maxlen=max_pending)
        self._lock = threading.Lock()
        self._on_finding = on_finding
        self.recorded = 0

    def record(self, finding: Finding) -> None:
        metrics.FINDINGS.labels(kind=finding.kind, source=finding.source).inc()
        log.warning(
            "audit.finding",
            finding_id=finding.id,
            kind=finding.kind,
            source=finding.source,
            summary=finding.summary,
            storage_key=finding.entry.storage_key,
            scope=finding.entry.scope,
            model=finding.entry.model,
            epoch=finding.entry.epoch,
        )
        with self._lock:
            self._pending.append(finding)
            self._drain_locked()
            self.recorded += 1
        if self._on_finding is not None:
            self._on_finding(finding)

    def _drain_locked(self) -> bool:
        while self._pending:
            finding = self._pending[0]
            try:
                self.journal.append(finding)
            except FindingsLogError as exc:
                metrics.UNRECORDED.inc()
                log.error("audit.journal.append_failed", error=str(exc), pending=len(self._pending))
                return False
            self._pending.popleft()
        return True

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self) -> bool:
        """Retry what is pending; True when nothing is left."""
        with self._lock:
            return self._drain_locked()

    def close(self) -> None:
        with self._lock:
            if not self._drain_locked() and self._fallback is not None:
                while self._pending:
                    finding = self._pending.popleft()
                    try:
                        self._fallback.append(finding)
                    except FindingsLogError as exc:
                        log.error("audit.finding.lost", finding=finding.as_dict(), error=str(exc))
            for finding in self._pending:
                log.error("audit.finding.unstored", finding=finding.as_dict())
            self._pending.clear()
        self.journal.close()
