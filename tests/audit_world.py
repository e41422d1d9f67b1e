"""A small world for the auditor's tests: tenants, a registry, requests keyed for real, entries
encoded with the real envelope, a deterministic oracle, and the faults the suite plants.

Every entry here is built exactly as the service builds one (``keying.build_key`` for the key,
``cachesvc.store`` for the envelope and the storage key), so the auditor sees real bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from audit import Answer, ModelState
from cachesvc.auditing import EntryReader
from cachesvc.events import CacheEvent
from cachesvc.store import Entry, EntryKeys, decode_entry, encode_entry, storage_key
from keying import KeyParams, KeyResult, Scope, build_key
from keying.framing import DEFAULT_MATERIAL_SECRET

MODEL = "m-test"
VERSION = "v2"
EPOCH = 2
OLD_VERSION = "v1"
OLD_EPOCH = 1
TENANTS = ("acme", "globex")
CANARIES = {"acme": ["CANARY-acme-7f3a9c"], "globex": ["CANARY-globex-0b41d2"]}
#: In the past, so the offline scan (which reads the real clock) sees no entry from the future.
NOW = 1_700_000_000.0
#: The world keys requests with keying's default secret, and signs entries under the same one,
#: as a service configured with it would.
KEYS = EntryKeys(DEFAULT_MATERIAL_SECRET)

#: Reads stored bytes as the service would, at the world's time.
READER = EntryReader(keys=KEYS, max_entry_bytes=8 * 1024 * 1024, max_ttl_s=30 * 86_400.0,
                     clock=lambda: NOW)


def body(i: int, *, temperature: float = 0) -> dict[str, Any]:
    return {"model": MODEL, "temperature": temperature,
            "messages": [{"role": "user", "content": f"question number {i}"}]}


def oracle_text(request: Mapping[str, Any]) -> str:
    """The one right answer to a request under the current model (deterministic)."""
    h = hashlib.sha256(repr(request["messages"][-1]["content"]).encode()).hexdigest()[:16]
    return f"answer {h}"


def response_for(text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]}


def key_for(tenant: str, i: int, *, epoch: int = EPOCH) -> KeyResult:
    return build_key(body(i), KeyParams(scope=Scope.for_tenant(tenant), epoch=epoch, kind="chat"))


def entry_for(key: KeyResult, *, text: str | None = None, version: str = VERSION,
              material: bool = True) -> Entry:
    """The entry the service would fill for ``key`` (with its key material, as by default)."""
    return Entry(scope=key.scope, model=key.model, model_version=version, epoch=key.epoch,
                 created_at=NOW, ttl=3600.0, digest=bytes(key.digest),
                 material_digest=bytes(key.material_digest),
                 response=response_for(text if text is not None else oracle_text(_body_of(key))),
                 material=key.material if material else None)


def _body_of(key: KeyResult) -> dict[str, Any]:
    content = key.canonical.fields["messages"][-1]["content"]
    if isinstance(content, list):  # the canonical form folds a string into one text part
        content = "".join(part["text"] for part in content)
    return {"messages": [{"role": "user", "content": content}]}


def skey(key: KeyResult) -> str:
    return storage_key(scope=key.scope, model=key.model, epoch=key.epoch, digest=bytes(key.digest))


@dataclass(frozen=True)
class Planted:
    """One forged entry: which request's key it sits under, the bytes, what must be found."""

    name: str
    tenant: str
    index: int
    raw: bytes
    scan_kinds: frozenset[str]  # kinds the scan (with an oracle) must report for it
    shadow_kinds: frozenset[str]  # kinds the shadow auditor must report on a hit


def plant_faults(n_clean: int, *, epoch: int = EPOCH) -> list[Planted]:
    """The five faults of the suite (and a leaked-answer variant), under acme's keys
    ``n_clean .. n_clean+5``, for a registry whose current epoch is ``epoch``."""
    base = n_clean
    out = []

    def current(tenant: str, i: int) -> KeyResult:
        return key_for(tenant, i, epoch=epoch)

    # 1. Another scope's entry under this scope's key.
    k = current("acme", base)
    other = current("globex", base)
    out.append(Planted("cross_scope", "acme", base, encode_entry(entry_for(other), keys=KEYS),
                       frozenset({"cross_scope"}), frozenset({"cross_scope"})))
    # 2. An old epoch's entry under the current key.
    k = current("acme", base + 1)
    old = key_for("acme", base + 1, epoch=epoch - 1)
    out.append(Planted("old_epoch", "acme", base + 1,
                       encode_entry(entry_for(old, version=OLD_VERSION), keys=KEYS),
                       frozenset({"stale"}), frozenset({"stale"})))
    # 3. A wrong material digest (a crafted xxh3 collision would look like this).
    k = current("acme", base + 2)
    forged = replace(entry_for(k),
                     material_digest=hashlib.blake2b(b"forged", digest_size=32).digest())
    out.append(Planted("material_digest", "acme", base + 2, encode_entry(forged, keys=KEYS),
                       frozenset({"collision"}), frozenset({"collision"})))
    # 4. Flipped bytes.
    k = current("acme", base + 3)
    raw = bytearray(encode_entry(entry_for(k), keys=KEYS))
    raw[len(raw) // 2] ^= 0x20
    out.append(Planted("flipped_bytes", "acme", base + 3, bytes(raw),
                       frozenset({"corrupt"}), frozenset({"corrupt"})))
    # 5. A wrong answer under a valid key.
    k = current("acme", base + 4)
    out.append(Planted("wrong_answer", "acme", base + 4,
                       encode_entry(entry_for(k, text="a confidently wrong answer"), keys=KEYS),
                       frozenset({"mismatch"}), frozenset({"mismatch"})))
    # 5b. The same, where the wrong answer is another tenant's (it carries their canary).
    k = current("acme", base + 5)
    leaked = f"globex's private answer {CANARIES['globex'][0]}"
    out.append(Planted("leaked_answer", "acme", base + 5,
                       encode_entry(entry_for(k, text=leaked), keys=KEYS),
                       frozenset({"canary"}), frozenset({"canary", "mismatch"})))
    return out


def clean_entries(n: int, *, epoch: int = EPOCH) -> list[tuple[str, bytes, KeyResult]]:
    out = []
    for tenant in TENANTS:
        for i in range(n):
            k = key_for(tenant, i, epoch=epoch)
            out.append((skey(k), encode_entry(entry_for(k), keys=KEYS), k))
    return out


def hit_event(tenant: str, i: int, raw: bytes, *, at: float = NOW) -> CacheEvent:
    """The event a service whose own verification was bypassed would emit for a hit."""
    k = key_for(tenant, i)
    try:
        entry: Entry | None = decode_entry(raw, keys=KEYS)
    except Exception:  # noqa: BLE001 - an entry the service could not read serves as empty
        entry = None
    served = entry.response if entry is not None else response_for("")
    return CacheEvent(kind="hit", tenant=tenant, scope=k.scope, request=body(i), key=k,
                      expected_model=MODEL, expected_version=VERSION, expected_epoch=EPOCH,
                      raw=raw, entry=entry, response=served, at=at)


class DeterministicOracle:
    """The reference answer for every request: exact, like the engine at temperature 0."""

    exact = True

    def __init__(self) -> None:
        self.calls = 0

    def complete(self, request: Mapping[str, Any], kind: str, *, tenant: str) -> Answer:
        self.calls += 1
        return Answer.of(response_for(oracle_text(request)))

    def score(self, request: Mapping[str, Any], kind: str, completion: str, *,
              tenant: str) -> Sequence[float] | None:
        return None


class StaticRegistry:
    def __init__(self, states: Mapping[str, ModelState]) -> None:
        self.states = dict(states)

    def current(self, model: str) -> ModelState | None:
        return self.states.get(model)


REGISTRY = {MODEL: ModelState(model=MODEL, version=VERSION, epoch=EPOCH)}
