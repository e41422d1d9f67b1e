"""The invariants an entry must keep, as pure functions over plain facts.

Each check returns a list of :class:`~audit.finding.Draft` (empty when the entry is clean).
The offline scan runs the ones that need no request (:func:`check_stored`); the shadow auditor
runs those plus the ones that compare an entry with the request it was served for
(:func:`check_served`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from audit.answer import Answer
from audit.facts import EntryFacts, ModelState, UnreadableEntry
from audit.finding import Draft, FindingKind
from keying import (
    InvalidMaterialError,
    KeyResult,
    Scope,
    decode_material,
    material_digest,
    response_digest,
)
from keying.framing import DEFAULT_MATERIAL_SECRET

#: A key component that disagrees with the entry's provenance, and what that means.
_KEY_FIELD_KIND: Mapping[str, FindingKind] = {
    "scope": "cross_scope",
    "epoch": "stale",
    "version": "stale",
    "model": "collision",
    "digest": "collision",
}


def check_unreadable(entry: UnreadableEntry) -> list[Draft]:
    """Bytes the codec refused are corrupt, whatever the reason; the evidence says which."""
    return [
        Draft(
            kind="corrupt",
            summary=f"entry cannot be decoded ({entry.reason})",
            evidence={"reason": entry.reason, "error": entry.error[:300], "size": entry.size},
        )
    ]


def check_placement(facts: EntryFacts) -> list[Draft]:
    """Every component of the storage key must match the entry's own provenance."""
    out = []
    for kf in facts.key_fields:
        if kf.in_key != kf.in_entry:
            out.append(
                Draft(
                    kind=_KEY_FIELD_KIND[kf.name],
                    summary=f"stored under a key whose {kf.name} is not the entry's own",
                    evidence={"field": kf.name, "in_key": kf.in_key, "in_entry": kf.in_entry},
                )
            )
    return out


def check_shape(facts: EntryFacts) -> list[Draft]:
    """An entry holds a response or a stream; an empty one would be served as nothing."""
    if not facts.has_answer:
        return [Draft(kind="corrupt", summary="entry holds neither a response nor a stream")]
    return []


def check_material(facts: EntryFacts, *, secret: bytes | None = DEFAULT_MATERIAL_SECRET
                   ) -> list[Draft]:
    """When the entry carries its key material: both digests must be the material's, and the
    material's own scope, model, epoch and adapter the entry's. Without material, nothing is
    checked here. ``secret=None`` (the service's secret is not known): the keyed material
    digest cannot be recomputed and is skipped; everything else is checked."""
    if facts.material is None:
        return []
    out = []
    if facts.digest is not None and response_digest(facts.material) != facts.digest:
        out.append(Draft(kind="collision", summary="entry digest is not the xxh3 of its material",
                         evidence={"digest": facts.digest.hex(),
                                   "recomputed": response_digest(facts.material).hex()}))
    if facts.material_digest is not None and secret is not None:
        recomputed = material_digest(facts.material, secret)
        if recomputed != facts.material_digest:
            out.append(Draft(kind="collision",
                             summary="material digest does not match the entry's key material",
                             evidence={"stored": facts.material_digest.hex(),
                                       "recomputed": recomputed.hex()}))
    try:
        parts = decode_material(facts.material)
    except InvalidMaterialError as exc:
        out.append(Draft(kind="corrupt", summary="key material in the entry cannot be parsed",
                         evidence={"error": str(exc)[:300]}))
        return out
    if parts.scope != facts.scope:
        out.append(Draft(kind="cross_scope", summary="key material names another scope",
                         evidence={"material_scope": parts.scope.label,
                                   "entry_scope": facts.scope.label}))
    if parts.model != facts.model:
        out.append(Draft(kind="collision", summary="key material names another model",
                         evidence={"material_model": parts.model, "entry_model": facts.model}))
    if parts.epoch != facts.epoch:
        out.append(Draft(kind="stale", summary="key material names another epoch",
                         evidence={"material_epoch": parts.epoch, "entry_epoch": facts.epoch}))
    if parts.adapter != facts.adapter:
        out.append(Draft(kind="collision", summary="key material names another adapter",
                         evidence={"material_adapter": parts.adapter,
                                   "entry_adapter": facts.adapter}))
    return out


def check_registry(facts: EntryFacts, current: ModelState | None) -> list[Draft]:
    """Against the registry now: an entry of the current epoch must carry the current version,
    and no entry may claim an epoch the registry has not issued yet.

    An entry of an older epoch is not a finding: the epoch is in its key, so no lookup can reach
    it; it only waits to be purged (the scan counts these as reclaimable). A model nobody rolled
    out is served at the registry's genesis epoch: pass it as ``current`` (version
    ``unversioned``). With no state at all, no epoch of the model was issued by this registry.
    """
    if current is None:
        return [Draft(kind="stale", summary="entry's model is unknown to the registry",
                      evidence={"model": facts.model, "entry_epoch": facts.epoch})]
    if facts.epoch > current.epoch:
        return [Draft(kind="stale", summary="entry claims an epoch the registry has not issued",
                      evidence={"entry_epoch": facts.epoch, "registry_epoch": current.epoch})]
    if (facts.epoch == current.epoch and facts.version is not None
            and facts.version != current.version):
        return [Draft(kind="stale", summary="entry of the current epoch carries another version",
                      evidence={"entry_version": facts.version, "registry_version": current.version,
                                "epoch": current.epoch})]
    return []


def canary_id(canary: str) -> str:
    """A short digest that names a canary in evidence without repeating it."""
    return hashlib.blake2b(canary.encode("utf-8"), digest_size=6).hexdigest()


def check_canaries(
    text: str, *, owner: Scope, canaries: Mapping[str, Sequence[str]]
) -> list[Draft]:
    """Another tenant's canary in text owned by (or served to) ``owner`` is a leak.

    ``canaries`` maps tenant id -> its canary strings. A tenant's own canaries in its own
    answers are expected; in a public entry every tenant's canary is a leak.
    """
    if not text:
        return []
    out = []
    for tenant, strings in canaries.items():
        if owner.kind != "public" and tenant == owner.tenant:
            continue
        for canary in strings:
            if canary and canary in text:
                out.append(Draft(kind="canary",
                                 summary=f"canary of tenant {tenant!r} in an answer of "
                                         f"{owner.label}",
                                 evidence={"canary_tenant": tenant, "canary_id": canary_id(canary),
                                           "scope": owner.label}))
    return out


def check_stored(
    facts: EntryFacts,
    *,
    current: ModelState | None,
    canaries: Mapping[str, Sequence[str]],
    secret: bytes | None = DEFAULT_MATERIAL_SECRET,
    check_registry_state: bool = True,
) -> list[Draft]:
    """Every invariant that can be checked without the request (the offline scan's set)."""
    out = check_shape(facts) + check_placement(facts) + check_material(facts, secret=secret)
    if check_registry_state:
        out += check_registry(facts, current)
    out += check_canaries(facts.answer.text, owner=facts.scope, canaries=canaries)
    return out


def check_served(
    facts: EntryFacts,
    *,
    key: KeyResult,
    scope: Scope,
    expected_model: str,
    expected_version: str | None,
    expected_epoch: int,
    served: Answer | None,
) -> list[Draft]:
    """A served entry against the request it was served for, and the registry view at the time."""
    out: list[Draft] = []
    if facts.scope != scope or key.scope != scope:
        out.append(Draft(kind="cross_scope",
                         summary=f"entry of {facts.scope.label} served to {scope.label}",
                         evidence={"entry_scope": facts.scope.label, "served_scope": scope.label}))
    if facts.material_digest is not None and facts.material_digest != key.material_digest:
        out.append(Draft(kind="collision", summary="entry's material digest is not the request's",
                         evidence={"entry": facts.material_digest.hex(),
                                   "request": key.material_digest.hex()}))
    if facts.material_digest is None:
        out.append(Draft(kind="corrupt", summary="served entry carries no material digest"))
    if facts.digest is not None and facts.digest != key.digest:
        out.append(Draft(kind="collision", summary="entry's digest is not the request's",
                         evidence={"entry": facts.digest.hex(), "request": key.digest.hex()}))
    if facts.model != key.model or facts.model != expected_model:
        out.append(Draft(kind="collision", summary="entry of another model served",
                         evidence={"entry_model": facts.model, "request_model": key.model,
                                   "expected_model": expected_model}))
    if facts.epoch != expected_epoch or key.epoch != expected_epoch:
        out.append(Draft(kind="stale", summary="entry's epoch is not the one the registry gave",
                         evidence={"entry_epoch": facts.epoch, "key_epoch": key.epoch,
                                   "expected_epoch": expected_epoch}))
    elif (expected_version is not None and facts.version is not None
            and facts.version != expected_version):
        out.append(Draft(kind="stale", summary="entry's version is not the one the registry gave",
                         evidence={"entry_version": facts.version,
                                   "expected_version": expected_version}))
    if served is not None and facts.has_answer and not served.same_as(facts.answer):
        out.append(Draft(kind="mismatch", summary="the answer served differs from the entry stored",
                         evidence={"served_chars": len(served.text),
                                   "stored_chars": len(facts.answer.text)}))
    return out
