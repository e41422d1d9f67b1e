"""Stored entries as the auditor sees them: decoded with the service's own codec and limits."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from audit import Answer, EntryFacts, KeyField, ModelState, Sample, UnreadableEntry
from audit.facts import UnreadableReason
from cachesvc.events import CacheEvent
from cachesvc.settings import Settings
from cachesvc.store.base import ResponseStore, parse_storage_key, scope_component, storage_key
from cachesvc.store.envelope import Entry, decode_entry
from cachesvc.store.errors import (
    EntryDecodeError,
    ForeignEntryError,
    ForgedEntryError,
    OversizeEntryError,
    UnknownKeyError,
    UnsupportedVersionError,
)
from cachesvc.store.mac import EntryKeys
from keying import escape_component


def facts_from_entry(entry: Entry, *, key: str, node: str | None = None) -> EntryFacts:
    """The auditor's view of a decoded entry stored under ``key``."""
    parts = parse_storage_key(key)
    if parts is None:
        expected = storage_key(scope=entry.scope, model=entry.model, epoch=entry.epoch,
                               digest=entry.digest)
        # Not our layout at all: report the whole key against the one the entry belongs under.
        fields: tuple[KeyField, ...] = (KeyField(name="digest", in_key=key, in_entry=expected),)
    else:
        fields = (
            KeyField(name="scope", in_key=parts.scope, in_entry=scope_component(entry.scope)),
            KeyField(name="model", in_key=parts.model, in_entry=escape_component(entry.model)),
            KeyField(name="epoch", in_key=str(parts.epoch), in_entry=str(entry.epoch)),
            KeyField(name="digest", in_key=parts.digest.hex(), in_entry=entry.digest.hex()),
        )
    served = entry.stream if entry.stream is not None else entry.response
    return EntryFacts(
        storage_key=key, node=node, scope=entry.scope, model=entry.model,
        version=entry.model_version, epoch=entry.epoch, digest=entry.digest,
        material_digest=entry.material_digest, created_at=entry.created_at, ttl=entry.ttl,
        adapter=entry.adapter, key_fields=fields, material=entry.material,
        answer=Answer.of(served), has_answer=served is not None,
        key_id=entry.key_id.hex() if entry.key_id else None,
    )


_UNREADABLE: tuple[tuple[type[EntryDecodeError], UnreadableReason], ...] = (
    (OversizeEntryError, "oversize"),
    (ForgedEntryError, "forged"),
    (UnknownKeyError, "unknown_key"),
    (ForeignEntryError, "foreign"),
    (UnsupportedVersionError, "unsupported"),
    (EntryDecodeError, "corrupt"),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class EntryReader:
    """How the auditor reads stored bytes: with the service's own keys and limits, so the scan
    and the shadow auditor refuse exactly what the hit path refuses (an unverified MAC, an
    unknown key id, oversize bytes, a bad answer shape, a lifetime the fill path never writes).
    """

    keys: EntryKeys
    max_entry_bytes: int
    max_ttl_s: float
    clock: Callable[[], float] = time.time

    @classmethod
    def of(cls, settings: Settings, keys: EntryKeys) -> EntryReader:
        return cls(keys=keys, max_entry_bytes=settings.limits.max_entry_bytes,
                   max_ttl_s=settings.limits.max_ttl_seconds)

    def facts(self, key: str, raw: bytes, *, node: str | None = None,
              now: float | None = None) -> EntryFacts | UnreadableEntry:
        """Decode ``raw`` with the store's own codec (MAC verified) into facts."""
        try:
            entry = decode_entry(raw, keys=self.keys, max_bytes=self.max_entry_bytes)
        except EntryDecodeError as exc:
            reason = next(r for t, r in _UNREADABLE if isinstance(exc, t))
            return UnreadableEntry(storage_key=key, node=node, reason=reason, error=str(exc),
                                   size=len(raw))
        problem = entry.lifetime_problem(self.clock() if now is None else now,
                                         max_ttl_s=self.max_ttl_s)
        if problem is not None:
            return UnreadableEntry(storage_key=key, node=node, reason="lifetime", error=problem,
                                   size=len(raw))
        return facts_from_entry(entry, key=key, node=node)

    def sample(self, event: CacheEvent) -> Sample:
        """Convert a service event in the auditor's thread (never on the request path).

        The raw bytes are decoded again here, independently of the service's own verification,
        and the storage key is the one the request was looked up under, so an entry of another
        scope, epoch or digest stored under this request's key shows up as a placement finding.
        """
        key = event.key
        lookup_key = storage_key(scope=event.scope, model=key.model, epoch=key.epoch,
                                 digest=bytes(key.digest))
        entry = self.facts(lookup_key, event.raw, now=event.at) if event.raw else None
        served = event.served
        return Sample(
            event=event.kind, tenant=event.tenant, scope=event.scope, request=event.request,
            key=key,
            expected=ModelState(model=event.expected_model, version=event.expected_version,
                                epoch=event.expected_epoch),
            entry=entry, served=Answer.of(served) if served is not None else None, at=event.at,
        )


async def scan_items(store: ResponseStore, reader: EntryReader, *, batch: int = 500
                     ) -> AsyncIterator[EntryFacts | UnreadableEntry]:
    """Every entry of ``store`` (every node of a cluster) as facts, for :class:`audit.Scanner`."""
    node_of = _node_namer(store)
    async for key, raw in store.scan_entries(batch=batch):
        yield reader.facts(key, raw, node=node_of(key))


def _node_namer(store: ResponseStore) -> Callable[[str], str | None]:
    """Which node holds a key: a Redis store knows (on a cluster); any other store has one."""
    from cachesvc.store.redis_store import RedisStore

    if isinstance(store, RedisStore):
        return store.node_of
    return lambda key: None
