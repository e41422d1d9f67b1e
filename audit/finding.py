"""A finding: one piece of evidence that the cache did (or could) serve something wrong.

Findings are values. They are written to a durable log (:mod:`audit.findings_log`) by the
recorder (:mod:`audit.recorder`), which also counts and logs them. A finding never carries
prompt or response text: evidence holds digests, scopes, epochs, lengths and scores; a canary
finding names which tenant's canary it saw, not the text around it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

FindingKind = Literal["stale", "cross_scope", "collision", "corrupt", "mismatch", "canary",
                      "timing", "drift"]
FINDING_KINDS: tuple[str, ...] = get_args(FindingKind)

#: What produced a finding: the shadow auditor (on a sampled hit or fill), the offline scan, the
#: timing audit, or the INT8 KV drift audit.
FindingSource = Literal["hit", "fill", "scan", "timing", "drift"]
FINDING_SOURCES: tuple[str, ...] = get_args(FindingSource)

#: One line per kind, for reports and the README.
KIND_MEANING: Mapping[str, str] = {
    "stale": "the entry's model epoch or version is behind the registry, or behind its own key",
    "cross_scope": "the entry was written by one scope and stored or served under another",
    "collision": "the entry is not the one its key names (material digest or key digest differs)",
    "corrupt": "the stored bytes fail their checksum or cannot be decoded",
    "mismatch": "a recompute under the current model disagrees with the cached answer",
    "canary": "another tenant's planted canary string appears in an answer",
    "timing": "response times tell one caller whether another caller's prompt is cached",
    "drift": "INT8 KV drifts from full precision beyond the model's thresholds (INT8 turned off)",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class EntryRef:
    """Which entry a finding is about. Every field is optional: a timing finding has no entry."""

    storage_key: str | None = None
    node: str | None = None
    digest: str | None = None  # hex
    # Scope.label of the entry's provenance (or of the key when undecodable)
    scope: str | None = None
    model: str | None = None
    epoch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "storage_key": self.storage_key,
            "node": self.node,
            "digest": self.digest,
            "scope": self.scope,
            "model": self.model,
            "epoch": self.epoch,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EntryRef:
        epoch = data.get("epoch")
        return cls(
            storage_key=data.get("storage_key"),
            node=data.get("node"),
            digest=data.get("digest"),
            scope=data.get("scope"),
            model=data.get("model"),
            epoch=int(epoch) if epoch is not None else None,
        )


def int8_off_where(action: str) -> str:
    """Where the drift guard turned INT8 off, from its action (``gpu_prefix.drift``): ``"for
    layers 3,7"`` for ``"layers:3,7"``; empty for the whole model (``"model"``) or none."""
    return "for layers " + action.removeprefix("layers:") if action.startswith("layers:") else ""


def new_finding_id() -> str:
    """A random 128-bit id in hex; findings from many replicas never clash."""
    return os.urandom(16).hex()


def new_run_id() -> str:
    """A short id for one scan or timing run: UTC time first (sorts by start), then random."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """One finding: its kind, the entry, the evidence and the time (seconds since the epoch)."""

    kind: FindingKind
    source: FindingSource
    entry: EntryRef
    evidence: Mapping[str, Any]
    at: float
    summary: str
    id: str = field(default_factory=new_finding_id)

    def __post_init__(self) -> None:
        if self.kind not in FINDING_KINDS:
            raise ValueError(f"finding kind {self.kind!r} is not one of {FINDING_KINDS}")
        if self.source not in FINDING_SOURCES:
            raise ValueError(f"finding source {self.source!r} is not one of {FINDING_SOURCES}")

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the form written to the durable log)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "source": self.source,
            "at": self.at,
            "summary": self.summary,
            "entry": self.entry.as_dict(),
            "evidence": dict(self.evidence),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """Read back what :meth:`as_dict` wrote; raises ``KeyError``/``ValueError`` on junk."""
        return cls(
            id=str(data["id"]),
            kind=data["kind"],
            source=data["source"],
            at=float(data["at"]),
            summary=str(data.get("summary", "")),
            entry=EntryRef.from_dict(data.get("entry") or {}),
            evidence=dict(data.get("evidence") or {}),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Draft:
    """A finding before it is stamped with a source and a time (what the checks return)."""

    kind: FindingKind
    summary: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def stamp(self, *, source: FindingSource, entry: EntryRef, at: float) -> Finding:
        return Finding(
            kind=self.kind, source=source, entry=entry, evidence=self.evidence, at=at,
            summary=self.summary,
        )
