"""The cache's request-path logic, independent of HTTP: key, look up, verify, fill, observe.

The proxy and the cache API routes both call this. It never raises because the store is unwell
(store trouble is a miss), and it refuses to serve any entry whose provenance does not match the
request exactly: scope, model, epoch and material digest are checked on every hit, so a digest
collision, a stale entry or a corrupted value is a miss, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog

from cachesvc import metrics
from cachesvc.cache_control import CacheControl
from cachesvc.cache_types import FillTarget, Keyed, LookupResult, Payload, Status
from cachesvc.errors import BadRequestError, ServiceError
from cachesvc.events import CacheEvent, CacheObserver, EventKind
from cachesvc.guarded_store import GuardedStore
from cachesvc.json_body import check_exact
from cachesvc.memo import Memo
from cachesvc.observers import Fanout, build_failed, deliver
from cachesvc.store.base import ResponseStore, storage_key
from cachesvc.store.envelope import Entry, decode_entry, encode_entry
from cachesvc.store.errors import EntryDecodeError, InvalidEntryError
from cachesvc.store.mac import EntryKeys
from cachesvc.tenants import Tenant
from keying import (
    InvalidRequestError,
    KeyLimits,
    KeyParams,
    KeyResult,
    build_key,
    material_digest,
)
from keying.fields import read_unkeyed

if TYPE_CHECKING:
    from cachesvc.models import ModelVersions

# NOTE: the value types live in cachesvc.cache_types; importers of this module keep finding
# them here.
__all__ = [
    "FILL_TOKEN_PREFIX",
    "FillTarget",
    "Keyed",
    "LookupResult",
    "Payload",
    "ResponseCache",
    "Status",
]

log = structlog.get_logger()

#: Where used fill tokens are marked (by digest): outside the entries' ``llmc:v1:`` keyspace.
FILL_TOKEN_PREFIX = "llmc:ft:"


#: The unkeyed fields the service reads (``user`` for the scope, ``stream`` and
#: ``stream_options`` for the delivery), with their type rule from the field table.
_READ_UNKEYED = tuple((f.name, f.pytype, f) for f in read_unkeyed())


def _check_read_unkeyed(body: dict[str, Any]) -> None:
    """Refuse an unkeyed field the service reads when it holds a value of the wrong type."""
    for name, pytype, f in _READ_UNKEYED:
        v = body.get(name)
        if v is not None and not isinstance(v, pytype):
            raise BadRequestError(f"`{name}` {f.problem}", field=name, fix=f.fix)


@dataclass
class ResponseCache:
    store: ResponseStore
    guard: GuardedStore
    versions: ModelVersions
    secret: bytes
    #: Signs every entry written and verifies every entry read (see cachesvc.store.mac).
    keys: EntryKeys
    observers: Sequence[CacheObserver] = field(default_factory=tuple)
    max_entry_bytes: int = 4 * 1024 * 1024
    max_request_bytes: int = 1024 * 1024
    #: The longest TTL the fill path writes; an entry read back with a longer one is refused.
    max_ttl_s: float = 30 * 86_400
    strict_epoch: bool = False
    #: Keep each entry's key material in it, for the offline scan (see ``Entry.material``).
    store_material: bool = True
    clock: Callable[[], float] = time.time
    _fanout: Fanout = field(default_factory=Fanout, init=False, repr=False)

    def __post_init__(self) -> None:
        self._keys: Memo[KeyResult] = Memo(max_items=8192, max_bytes=64 * 1024 * 1024)
        self._entries: Memo[Entry] = Memo(max_items=8192, max_bytes=64 * 1024 * 1024)
        self._limits = KeyLimits(max_bytes=self.max_request_bytes)

    async def key(self, tenant: Tenant, body: Any, kind: str, *, raw: bytes | None = None
                  ) -> Keyed:
        """Key ``body`` for ``tenant``; bad input raises ``BadRequestError`` naming the field.

        ``raw``, the exact bytes ``body`` was parsed from, lets a repeat skip the key builder.
        """
        if not isinstance(body, dict):
            raise BadRequestError("the request body must be a JSON object", field="body",
                                  fix="send an OpenAI-style request object")
        _check_read_unkeyed(body)
        opts = body.get("stream_options")
        scope = tenant.scope_for(body)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequestError("`model` is missing or not a string", field="model",
                                  fix='name the model, e.g. "model": "smollm2"')
        registry_ok = True
        try:
            version, epoch = await self.versions.current(model)
        except ServiceError:
            # NOTE: without a confirmed epoch no entry may be served or written: bypass.
            registry_ok, version, epoch = False, "", 0
        memo_key = (raw, scope, epoch, kind, tenant.cache_nondeterministic) if raw else None
        key = self._keys.get(memo_key) if memo_key is not None else None
        if key is None:
            if raw is not None:
                check_exact(raw, body)
            try:
                key = build_key(body, KeyParams(
                    scope=scope, epoch=epoch, kind=kind,  # type: ignore[arg-type]
                    allow_nondeterministic=tenant.cache_nondeterministic, secret=self.secret,
                    limits=self._limits,
                ))
            except InvalidRequestError as exc:
                raise BadRequestError(exc.problem, field=exc.field, fix=exc.fix) from None
            if memo_key is not None:
                self._keys.put(memo_key, key, len(raw) + len(key.material))  # type: ignore[arg-type]
        stream = body.get("stream") is True
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        return Keyed(tenant=tenant, scope=scope, body=body, kind=kind, key=key, version=version,
                     epoch=epoch, stream=stream, include_usage=include_usage,
                     registry_ok=registry_ok,
                     storage_key=storage_key(scope=scope, model=key.model, epoch=epoch,
                                                  digest=bytes(key.digest)))

    async def lookup(self, keyed: Keyed, cc: CacheControl, *, route: str) -> LookupResult:
        """Hit, miss or bypass for ``keyed``; a hit has been verified against the request."""
        if not keyed.registry_ok:
            return self._count(LookupResult(status="bypass", reason="registry unavailable: "
                                            "model epoch unconfirmed"), route, keyed)
        if not keyed.key.cacheability.cacheable:
            return self._count(LookupResult(status="bypass",
                                            reason=keyed.key.cacheability.reason), route, keyed)
        if cc.no_cache:
            return self._count(LookupResult(status="miss", reason="no-cache: lookup skipped"),
                               route, keyed)
        t0 = time.perf_counter()
        try:
            skey = keyed.storage_key
            raw = await self.guard.call("get", lambda: self.store.get(skey))
            if self.guard.failed(raw):
                return self._count(LookupResult(status="miss", reason="store unavailable"),
                                   route, keyed)
            if raw is None:
                return self._count(LookupResult(status="miss", reason="not cached"), route, keyed)
            assert isinstance(raw, bytes)
            result = await self._verify(keyed, raw, cc)
            return self._count(result, route, keyed)
        finally:
            metrics.LOOKUP_LATENCY.observe(time.perf_counter() - t0)

    async def _verify(self, keyed: Keyed, raw: bytes, cc: CacheControl) -> LookupResult:
        entry = self._entries.get(raw) if len(raw) <= self.max_entry_bytes else None
        if entry is None:
            try:
                # Oversize bytes are refused before they are hashed or decoded; the MAC is
                # checked before the payload is parsed.
                entry = decode_entry(raw, keys=self.keys, material=False,  # the hit never reads it
                                     max_bytes=self.max_entry_bytes)
            except EntryDecodeError as exc:
                return self._reject("corrupt",
                                    f"entry could not be decoded ({type(exc).__name__})", raw,
                                    keyed=keyed, entry=None)
            self._entries.put(raw, entry, 2 * len(raw))
        md = bytes(keyed.key.material_digest)
        if entry.key_id != self.keys.current_id:
            # During a rotation an entry signed under a previous secret keeps the material
            # digest of that secret (the MAC already proved the key id is one of ours).
            old = self.keys.secret_for(entry.key_id)
            md = material_digest(keyed.key.material, old) if old is not None else b""
        why = entry.mismatch(scope=keyed.scope, model=keyed.key.model, epoch=keyed.epoch,
                             digest=bytes(keyed.key.digest), material_digest=md,
                             adapter=keyed.key.adapter)
        if why is not None:
            return self._reject(why, f"entry does not match the request ({why})", raw,
                                keyed=keyed, entry=entry)
        if self.strict_epoch and not await self.versions.is_current(keyed.key.model, entry.epoch):
            return self._reject("stale", "entry's epoch has passed (strict check)", raw,
                                keyed=keyed, entry=entry)
        now = self.clock()
        problem = entry.lifetime_problem(now, max_ttl_s=self.max_ttl_s)
        if problem is not None:
            return self._reject("corrupt", problem, raw, keyed=keyed, entry=entry)
        if entry.is_expired(now):
            return LookupResult(status="miss", reason="expired", raw=raw)
        age = int(entry.age(now))
        if cc.max_age is not None and age > cc.max_age:
            return LookupResult(status="miss", reason=f"older than max-age={cc.max_age}", raw=raw)
        return LookupResult(status="hit", reason="verified", payload=Payload.of(entry), age=age,
                            raw=raw, entry=entry)

    def _reject(self, reason: str, message: str, raw: bytes, *, keyed: Keyed,
                entry: Entry | None) -> LookupResult:
        metrics.REJECTED_ENTRIES.labels(reason).inc()
        log.warning("entry_rejected", reason=reason, detail=message)
        self._notify_rejected(keyed, raw, entry)
        return LookupResult(status="miss", reason=f"entry rejected: {message}", raw=raw)

    def _notify_rejected(self, keyed: Keyed, raw: bytes, entry: Entry | None) -> None:
        """A refused entry is a miss *plus a finding*: every observer is offered it (the
        shadow auditor always checks it, whatever its sample rate). Never raises."""
        if not self.observers:
            return
        try:
            event = self._event("hit", keyed, raw, entry, stream=keyed.stream)
        except Exception:  # noqa: BLE001
            build_failed((), "hit")  # nobody asked for it: counted and logged
            return
        deliver(self.observers, lambda o: o.rejected(event))

    def _count(self, result: LookupResult, route: str, keyed: Keyed) -> LookupResult:
        # NOTE: hits and misses are counted here, with the lookups, so the counters agree
        # (sum of hits and misses over tenants = lookups with those outcomes), whatever the
        # route does next (an only-if-cached miss answers 504 but was still a miss).
        metrics.child(metrics.LOOKUPS, result.status, route).inc()
        if result.status == "hit":
            metrics.child(metrics.HITS, keyed.tenant.id, keyed.key.model).inc()
        elif result.status == "miss":
            metrics.child(metrics.MISSES, keyed.tenant.id, keyed.key.model).inc()
        else:
            metrics.BYPASSES.labels(_reason_label(result.reason)).inc()
        return result

    async def fill(self, target: FillTarget, payload: Payload, *, source: str,
                   keyed: Keyed | None = None) -> str | None:
        """Store ``payload`` at ``target``; None when stored, else why not (and a metric):
        "too_large", "unencodable", "store_unavailable" or "stale_epoch" (a rollout happened
        while it was computed; the entry is deleted again).

        ``keyed`` (the request that produced it) is passed on to observers when known.
        """
        try:
            entry = Entry(
                scope=target.scope, model=target.model, model_version=target.version,
                epoch=target.epoch, created_at=self.clock(), ttl=float(target.ttl_seconds),
                digest=target.digest, material_digest=target.material_digest,
                adapter=target.adapter, response=payload.body, stream=payload.chunks,
                material=target.material if self.store_material else None,
            )
            raw = encode_entry(entry, keys=self.keys)
        except (InvalidEntryError, TypeError, ValueError) as exc:
            metrics.FILL_SKIPS.labels("unencodable").inc()
            log.warning("fill_skipped", reason="unencodable", error=str(exc)[:200])
            return "unencodable"
        if len(raw) > self.max_entry_bytes and entry.material is not None:
            # The material is for the audit; it must never cost the entry its place.
            entry = replace(entry, material=None)
            raw = encode_entry(entry, keys=self.keys)
        if len(raw) > self.max_entry_bytes:
            metrics.FILL_SKIPS.labels("too_large").inc()
            log.info("fill_skipped", reason="too_large", bytes=len(raw))
            return "too_large"
        skey = target.storage_key
        res = await self.guard.call("put", lambda: self.store.set(
            skey, raw, ttl=float(target.ttl_seconds)))
        if self.guard.failed(res):
            metrics.FILL_SKIPS.labels("store_unavailable").inc()
            return "store_unavailable"
        if not await self._epoch_current(target):
            # A fill that raced a rollout (its upstream call began under the old epoch) must
            # not outlive it: asked after the write, so a rollout either came first and is seen
            # here, or came after and its purge deletes the entry.
            await self.guard.call("delete", lambda: self.store.delete(skey))
            metrics.FILL_SKIPS.labels("stale_epoch").inc()
            return "stale_epoch"
        metrics.FILLS.labels(source).inc()
        if keyed is not None:
            self.notify("fill", keyed, raw, entry, payload, source=source)
        return None

    async def claim_fill_token(self, token: str, expires_at: float) -> bool | None:
        """Use ``token`` up: True the first time, False after; None when the store cannot say
        (the caller must not store then: a token must never permit two writes)."""
        digest = hashlib.blake2b(token.encode(), digest_size=16).hexdigest()
        ttl = max(1.0, expires_at - self.clock())
        res = await self.guard.call("claim", lambda: self.store.claim(
            f"{FILL_TOKEN_PREFIX}{digest}", ttl=ttl))
        return None if self.guard.failed(res) else bool(res)

    async def _epoch_current(self, target: FillTarget) -> bool:
        try:
            return (await self.versions.current(target.model))[1] == target.epoch
        except ServiceError:
            return False  # the epoch cannot be confirmed: do not keep the entry

    def notify(self, kind: EventKind, keyed: Keyed, raw: bytes, entry: Entry | None,
               payload: Payload, *, source: str = "", served_stream: bool | None = None) -> None:
        """Tell the observers that want this event (:class:`~cachesvc.observers.Fanout`);
        the event is built only when one does. Never raises, never blocks beyond the
        observers' own enqueue."""
        observers = self._fanout.wanting(self.observers, kind)
        if not observers:
            return
        stream = keyed.stream if served_stream is None else served_stream
        try:
            if stream:
                chunks = payload.as_chunks(keyed.kind, include_usage=keyed.include_usage)
                response = None
            else:
                chunks, response = None, payload.as_body(keyed.kind)
            event = self._event(kind, keyed, raw, entry, stream=stream, response=response,
                                chunks=chunks, source=source)
        except Exception:  # noqa: BLE001
            build_failed(observers, kind)
            return
        deliver(observers, lambda o: o.observe(event))

    def _event(self, kind: EventKind, keyed: Keyed, raw: bytes, entry: Entry | None, *,
               stream: bool, response: Any = None, chunks: Any = None,
               source: str = "") -> CacheEvent:
        return CacheEvent(kind=kind, tenant=keyed.tenant.id,
                          scope=keyed.scope, request=keyed.body, key=keyed.key,
                          expected_model=keyed.key.model, expected_version=keyed.version,
                          expected_epoch=keyed.epoch, raw=raw, entry=entry,
                          response=response, chunks=chunks, stream=stream, at=self.clock(),
                          source=source)


def _reason_label(reason: str) -> str:
    """A low-cardinality label for a bypass reason ("nondeterministic", "live data", ...)."""
    return reason.split(":", 1)[0].strip()[:40] or "other"
