"""Small factories shared by the store and invalidation tests."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

from cachesvc.store import Entry, EntryKeys, storage_key
from cachesvc.store.envelope import FORMAT_VERSION, HEADER_SIZE, MAGIC
from keying import Scope

#: The service secret of the test settings (tests/service_helpers.py) and the entry keys it
#: gives: entries the tests plant are signed as the service under test signs them.
TEST_SECRET = b"test-secret-0123456789abcdef"
KEYS = EntryKeys(TEST_SECRET)


def digest_of(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def material_of(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=32).digest()


def make_entry(
    *,
    scope: Scope | None = None,
    model: str = "m1",
    version: str = "v1",
    epoch: int = 1,
    name: object = "req",
    created_at: float = 1_700_000_000.0,
    ttl: float | None = 3600.0,
    response: dict[str, Any] | None = None,
    stream: list[dict[str, Any]] | None = None,
) -> Entry:
    scope = scope or Scope.for_tenant("acme")
    if response is None and stream is None:
        response = {"id": "cmpl-1", "choices": [{
            "index": 0, "finish_reason": "stop", "message": {"content": f"answer {name}"}}]}
    return Entry(
        scope=scope,
        model=model,
        model_version=version,
        epoch=epoch,
        created_at=created_at,
        ttl=ttl,
        digest=digest_of(scope, model, name),
        material_digest=material_of(scope, model, epoch, name),
        response=response,
        stream=stream,
    )


def key_for(entry: Entry) -> str:
    return storage_key(
        scope=entry.scope, model=entry.model, epoch=entry.epoch, digest=entry.digest
    )


def signed(payload: bytes) -> bytes:
    """An envelope around ``payload`` with a valid MAC: a writer's bug, not damage or forgery."""
    header = MAGIC + bytes((FORMAT_VERSION,)) + KEYS.current_id
    return header + KEYS.sign(header, payload) + payload


def payload_of(raw: bytes) -> dict[str, Any]:
    """The msgpack payload of a stored envelope, decoded without any check."""
    return msgpack.unpackb(raw[HEADER_SIZE:], raw=False)  # type: ignore[no-any-return]

