"""One sampled hit or fill, in the auditor's plain types (what every shadow check reads)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from audit.answer import Answer
from audit.facts import EntryFacts, ModelState, UnreadableEntry
from audit.finding import EntryRef
from keying import KeyResult, Scope

EventKind = Literal["hit", "fill"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Sample:
    """One sampled hit or fill, in the auditor's plain types."""

    event: EventKind
    tenant: str
    scope: Scope
    request: Mapping[str, Any]
    key: KeyResult
    expected: ModelState
    entry: EntryFacts | UnreadableEntry | None
    served: Answer | None
    at: float

    def ref(self) -> EntryRef:
        e = self.entry
        return EntryRef(
            storage_key=e.storage_key if e is not None else None,
            node=e.node if e is not None else None,
            digest=self.key.digest.hex(),
            scope=(e.scope.label if isinstance(e, EntryFacts) else self.scope.label),
            model=(e.model if isinstance(e, EntryFacts) else self.key.model),
            epoch=(e.epoch if isinstance(e, EntryFacts) else self.key.epoch),
        )
