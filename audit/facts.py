"""The auditor's view of a stored entry, in plain types.

``audit`` does not import the service or its stores. The service's adapter decodes an entry
with the store's own codec and fills these values in; the checks read nothing else. What the
adapter cannot know it leaves ``None``, and the checks that need it are skipped (and say so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from audit.answer import Answer
from keying import Scope

KeyFieldName = Literal["scope", "model", "epoch", "digest", "version"]


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyField:
    """One component of the storage key beside the same component from the entry's provenance.

    Both are spelled the way the key layout spells them (escaped or hashed), so they compare
    as strings; the auditor never needs to parse or reverse the layout.
    """

    name: KeyFieldName
    in_key: str
    in_entry: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelState:
    """What the registry says about a model now."""

    model: str
    version: str
    epoch: int


@dataclass(frozen=True, kw_only=True, slots=True)
class EntryFacts:
    """A decoded entry: its provenance, where it is stored, and its answer."""

    storage_key: str
    node: str | None = None
    scope: Scope
    model: str
    version: str | None = None
    epoch: int
    digest: bytes | None = None
    material_digest: bytes | None = None
    created_at: float | None = None
    ttl: float | None = None
    adapter: str | None = None
    key_fields: tuple[KeyField, ...] = ()
    #: The framed key material, when the envelope carries it: lets the scan recompute both
    #: digests and read the scope, model and epoch the key was built from.
    material: bytes | None = None
    answer: Answer = field(default_factory=lambda: Answer(choices=()))
    has_answer: bool = True
    #: The id (hex) of the key the entry's MAC verified under; it names the secret that keys
    #: the entry's material digest (a previous one during a rotation).
    key_id: str | None = None


#: Why the service's codec refused stored bytes. ``forged``: the MAC does not verify;
#: ``unknown_key``: signed under a key id no configured secret has; ``oversize``: over
#: max_entry_bytes; ``lifetime``: no TTL, a TTL over the limit, or created in the future;
#: ``corrupt``: truncated, or not the entry schema or the response shape.
UnreadableReason = Literal["corrupt", "foreign", "unsupported", "forged", "unknown_key",
                           "oversize", "lifetime"]


@dataclass(frozen=True, kw_only=True, slots=True)
class UnreadableEntry:
    """Bytes under an entry key that the codec refused (checksum, foreign, unknown version)."""

    storage_key: str
    node: str | None = None
    reason: UnreadableReason
    error: str
    size: int = 0
