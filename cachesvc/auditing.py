"""Adapters between the auditor (``audit/``) and the service: stores, envelopes, events,
settings, the registry, oracles and the timing audit's HTTP prober.

``audit`` works on its own plain types; this module is the only place that knows both sides.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import structlog

from audit import (
    Answer,
    EntryFacts,
    FileJournal,
    Journal,
    KeyField,
    ModelState,
    OracleError,
    Recorder,
    RedisJournal,
    Sample,
    ShadowAuditor,
    ShadowConfig,
    TimingProbeError,
    UnreadableEntry,
)
from audit.facts import UnreadableReason
from audit.oracle import RequestKind
from cachesvc.events import CacheEvent
from cachesvc.store.base import parse_storage_key, scope_component, storage_key
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

log = structlog.get_logger("cachesvc.auditing")

# -- entries -> facts ----------------------------------------------------------------------


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
    def of(cls, settings: Any, keys: EntryKeys) -> EntryReader:
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


def _node_namer(store: Any) -> Callable[[str], str | None]:
    """``host:port`` of the Redis Cluster node that holds a key (None off a cluster)."""
    client = getattr(store, "client", None)
    locate = getattr(client, "get_node_from_key", None)
    if locate is None:
        return lambda key: None

    def name(key: str) -> str | None:
        try:
            node = locate(key)
        except Exception:  # a slot map being refreshed: attribution is best effort
            return None
        return f"{node.host}:{node.port}" if node is not None else None

    return name


async def scan_items(store: Any, reader: EntryReader, *, batch: int = 500
                     ) -> AsyncIterator[EntryFacts | UnreadableEntry]:
    """Every entry of ``store`` (every node of a cluster) as facts, for :class:`audit.Scanner`."""
    node_of = _node_namer(store)
    async for key, raw in store.scan_entries(batch=batch):
        k = key.decode() if isinstance(key, bytes) else key
        yield reader.facts(k, raw, node=node_of(k))


# -- events -> samples -----------------------------------------------------------------------


class ShadowObserver:
    """The service's :class:`~cachesvc.events.CacheObserver`: hands events to the auditor."""

    def __init__(self, auditor: ShadowAuditor[CacheEvent]) -> None:
        self.auditor = auditor
        #: ``wants(kind)``: the sampling draw for one event (the auditor's own, bound once: it
        #: runs on every hit). True when it is a sample, so the service builds the event (and
        #: calls :meth:`observe`) only for the ones checked.
        self.wants = auditor.draw
        #: ``pass_over(kind)``: how many following events the service may count down itself.
        self.pass_over = auditor.pass_over

    def observe(self, event: CacheEvent) -> None:
        """An event that :meth:`wants` drew as a sample: queue it (never blocks)."""
        self.auditor.enqueue(event, event.kind)

    def abandon(self, kind: str) -> None:
        """A drawn sample whose event could not be built."""
        self.auditor.abandon()

    def rejected(self, event: CacheEvent) -> None:
        """An entry the service's own verification refused (it answered a miss): always checked,
        so the refusal becomes a durable finding with its evidence. ``event`` is built as for a
        hit, with the raw bytes read and no response served. Never blocks, never raises."""
        self.auditor.offer(event, force=True)


# -- registry -------------------------------------------------------------------------------


def _model_state(model: str, value: Any) -> ModelState | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        version, epoch = value
        return ModelState(model=model, version=str(version), epoch=int(epoch))
    return ModelState(model=model, version=str(value.version), epoch=int(value.epoch))


class LoopRegistryView:
    """A synchronous view of an asyncio registry, for the auditor's worker thread.

    ``registry.current(model, fresh=True)`` (async, returning ``(version, epoch)`` or an object
    with ``version`` and ``epoch``; ``cachesvc.models.ModelVersions``) runs on the service's
    event loop, where its clients live. ``fresh``: read the registry itself, not the replica's
    cached view: a replica that missed a rollout must not be judged by its own view.
    """

    def __init__(self, registry: Any, loop: asyncio.AbstractEventLoop, *, timeout: float = 2.0,
                 cache_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._registry = registry
        self._loop = loop
        self._timeout = timeout
        # NOTE: answers are kept for ``cache_s`` (far below the auditor's staleness grace), so a
        # busy auditor does not queue a registry read on the service's loop for every sample.
        self._cache_s = cache_s
        self._clock = clock
        self._cached: dict[str, tuple[float, ModelState | None]] = {}

    def current(self, model: str) -> ModelState | None:
        now = self._clock()
        hit = self._cached.get(model)
        if hit is not None and now - hit[0] < self._cache_s:
            return hit[1]
        fut = asyncio.run_coroutine_threadsafe(self._registry.current(model, fresh=True),
                                               self._loop)
        state = _model_state(model, fut.result(self._timeout))
        self._cached[model] = (now, state)
        return state


async def registry_snapshot(registry: Any, models: Sequence[str] = ()) -> dict[str, ModelState]:
    """Every model the registry knows (``list()``), plus ``models``, as ModelState."""
    out: dict[str, ModelState] = {}
    lister = getattr(registry, "list", None)
    if lister is not None:
        for item in await lister():
            if isinstance(item, Mapping):
                m = str(item["model"])
                out[m] = ModelState(model=m, version=str(item["version"]), epoch=int(item["epoch"]))
            else:
                out[item.model] = ModelState(model=item.model, version=str(item.version),
                                             epoch=int(item.epoch))
    for m in models:
        if m not in out:
            state = _model_state(m, await registry.current(m))
            if state is not None:
                out[m] = state
    return out


async def run_scan(settings: Any, store: Any, journal: Journal, *, registry: Any,
                   secret: bytes, target: str, batch: int = 500, oracle: Any = None,
                   progress: Callable[[int], None] | None = None) -> Any:
    """One offline scan of ``store``: the registry snapshot, every entry checked, findings
    recorded, the result saved to ``journal`` for reports. Shared by ``cachesvc audit scan``
    (Redis, from the CLI's process) and ``POST /admin/scan`` (any store, inside the service).
    ``secret`` is the service's: every entry's MAC is verified under it and the configured
    ``[cache] previous_secrets``, as the hit path does. ``registry=None`` skips the checks
    against the registry."""
    from audit import Scanner
    from cachesvc.store.mac import key_id

    previous = [s.encode() for s in settings.cache.previous_secrets]
    reader = EntryReader.of(settings, EntryKeys(secret, previous))
    snapshot = await registry_snapshot(registry) if registry is not None else {}
    genesis = await registry.genesis() if registry is not None else None
    recorder = Recorder(journal)
    scanner = Scanner(recorder=recorder, registry=snapshot, canaries=canaries_of(settings),
                      check_registry=registry is not None, secret=secret, oracle=oracle,
                      previous_secrets={key_id(s).hex(): s for s in previous}, genesis=genesis,
                      target=target)
    try:
        result = await scanner.run(scan_items(store, reader, batch=batch), progress=progress)
        journal.save_result("scan", result.as_dict())
    finally:
        recorder.close()
    return result


def material_secret(settings: Any) -> bytes | None:
    """The service's material-digest secret: the config's, else the one the service keeps in
    ``<state_dir>/secret`` (read only; a scan never creates one)."""
    if settings.cache.secret:
        return settings.cache.secret.encode()
    try:
        data = (Path(settings.state_dir) / "secret").read_bytes().strip()
    except OSError:
        return None
    return data if len(data) >= 32 else None


# -- journals -------------------------------------------------------------------------------


def default_findings_path(state_dir: str) -> Path:
    return Path(state_dir).expanduser() / "audit" / "findings.jsonl"


def open_journal(*, redis_url: str | None, findings_path: str | Path, redis_prefix: str = "llmc:audit") -> Journal:
    """A Redis-stream journal beside a Redis store, a file journal beside the embedded one."""
    if not redis_url:
        return FileJournal(findings_path)
    import redis
    from urllib.parse import urlsplit

    scheme = urlsplit(redis_url).scheme
    if scheme in ("redis+cluster", "rediss+cluster"):
        from redis.cluster import ClusterNode, RedisCluster

        netloc = urlsplit(redis_url).netloc.rpartition("@")[2]
        nodes = []
        for item in netloc.split(","):
            host, _, port = item.rpartition(":")
            nodes.append(ClusterNode(host.strip("[]"), int(port)))
        client: Any = RedisCluster(startup_nodes=nodes, ssl=scheme.startswith("rediss"),
                                   socket_timeout=2.0, socket_connect_timeout=2.0)
    else:
        client = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    return RedisJournal(client, prefix=redis_prefix)


def make_recorder(journal: Journal, *, fallback_path: str | Path | None = None) -> Recorder:
    fallback = FileJournal(fallback_path) if fallback_path is not None else None
    return Recorder(journal, fallback=fallback)


# -- oracles --------------------------------------------------------------------------------


class EngineOracle:
    """Recompute with the in-process reference engine, through the same OpenAI translation the
    service uses (``cachesvc.engine_api``), so a deterministic request reproduces exactly."""

    exact = True

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def complete(self, request: Mapping[str, Any], kind: RequestKind, *, tenant: str) -> Answer:
        """In the calling thread (the auditor's worker, or the scan): no event loop or thread
        hop per recompute, and the worker's CPU time includes the model's work."""
        from cachesvc import engine_api

        body = dict(request)
        body["stream"] = False
        body.pop("stream_options", None)
        try:
            out = engine_api.complete_blocking(self.engine, body, kind, tenant=tenant)
        except Exception as exc:
            raise OracleError(f"engine recompute failed: {exc!r}") from exc
        return Answer.of(out)

    def score(self, request: Mapping[str, Any], kind: RequestKind, completion: str, *,
              tenant: str) -> Sequence[float] | None:
        try:
            if kind == "chat":
                prompt_ids = self.engine.chat_prompt_ids(list(request.get("messages") or []))
            else:
                prompt = request.get("prompt")
                if not isinstance(prompt, str):
                    return None
                prompt_ids = self.engine.encode(prompt)
            completion_ids = self.engine.encode(completion)
            if not completion_ids:
                return None
            return list(self.engine.score(prompt_ids, completion_ids))
        except Exception as exc:
            raise OracleError(f"engine scoring failed: {exc!r}") from exc


class UpstreamOracle:
    """Recompute through an OpenAI-compatible upstream. Not exact by default: hosted models are
    not bit-reproducible even at temperature 0, so a text difference alone is not a finding.
    Scoring is not available through the chat API, so sampled answers stay undecided."""

    def __init__(self, url: str, *, api_key: str | None = None, exact: bool = False,
                 timeout: float = 60.0, client: httpx.Client | None = None) -> None:
        self.exact = exact
        self._base = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.Client(timeout=timeout, headers=headers)

    def complete(self, request: Mapping[str, Any], kind: RequestKind, *, tenant: str) -> Answer:
        body = dict(request)
        body["stream"] = False
        body.pop("stream_options", None)
        path = "/chat/completions" if kind == "chat" else "/completions"
        try:
            resp = self._client.post(self._base + path, json=body)
        except httpx.HTTPError as exc:
            raise OracleError(f"upstream {self._base}{path}: {exc!r}") from exc
        if resp.status_code != 200:
            raise OracleError(f"upstream {self._base}{path} answered {resp.status_code}")
        return Answer.of(resp.json())

    def score(self, request: Mapping[str, Any], kind: RequestKind, completion: str, *,
              tenant: str) -> Sequence[float] | None:
        return None


# -- building the auditor from settings -----------------------------------------------------


def canaries_of(settings: Any) -> dict[str, list[str]]:
    return {t.id: list(t.canaries) for t in settings.tenants if t.canaries}


def build_shadow_auditor(
    settings: Any,
    *,
    keys: EntryKeys,
    oracle: Any = None,
    registry_view: Any = None,
    journal: Journal | None = None,
    rng: Any = None,
) -> ShadowAuditor[CacheEvent]:
    """The shadow auditor the service runs, from its ``[audit]`` settings. Not started."""
    a = settings.audit
    findings_path = a.findings_path or default_findings_path(settings.state_dir)
    if journal is None:
        journal = open_journal(redis_url=settings.redis.url, findings_path=findings_path)
    recorder = make_recorder(
        journal, fallback_path=None if isinstance(journal, FileJournal) else findings_path)
    grace = a.stale_grace_s
    if grace is None:
        grace = max(30.0, 2 * settings.cache.registry_refresh_s)
    config = ShadowConfig(
        sample_rate=a.sample_rate, fill_sample_rate=a.fill_sample_rate, queue_size=a.queue_size,
        stale_grace_s=grace, canaries=canaries_of(settings),
        recompute=oracle is not None and a.oracle != "none",
        recompute_budget=a.recompute_budget, recompute_burst_s=a.recompute_burst_s,
        batch_wait_s=a.batch_wait_s,
    )
    return ShadowAuditor(recorder=recorder, convert=EntryReader.of(settings, keys).sample,
                         config=config,
                         oracle=oracle if a.oracle != "none" else None, registry=registry_view,
                         rng=rng)


# -- the timing audit's prober --------------------------------------------------------------


class HttpProber:
    """One OpenAI-compatible request with one output token; returns seconds to the answer.

    With ``max_tokens`` 1 the whole response time is the time to first token; a streamed
    request would add SSE framing to both trial kinds alike and measure nothing more.
    """

    def __init__(self, url: str, *, model: str, endpoint: str = "chat", timeout: float = 60.0,
                 clock: Callable[[], float] = time.perf_counter,
                 client: httpx.Client | None = None) -> None:
        if endpoint not in ("chat", "completion"):
            raise ValueError(f"--endpoint {endpoint!r}: use chat or completion")
        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.url = base + ("/chat/completions" if endpoint == "chat" else "/completions")
        self.model = model
        self.endpoint = endpoint
        self._clock = clock
        self._client = client or httpx.Client(timeout=timeout)

    def body(self, prompt: str, user: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": 1, "temperature": 0}
        if user is not None:
            body["user"] = user
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def __call__(self, *, key: str, prompt: str, user: str | None = None) -> float:
        body = self.body(prompt, user)
        # NOTE: no-store keeps the probes' random prompts out of the tenant's response cache (a
        # run would otherwise leave thousands of entries nobody will ask for again); a prefix
        # cache behind the service still sees them, which is what the audit measures.
        headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-store"}
        t0 = self._clock()
        try:
            resp = self._client.post(self.url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise TimingProbeError(
                f"{self.url}: {exc!r}; check --url and that the server is up") from exc
        elapsed = self._clock() - t0
        if resp.status_code != 200:
            raise TimingProbeError(
                f"{self.url} answered {resp.status_code} for key ...{key[-4:]}: "
                f"{resp.text[:200]}; check the key and --model")
        return elapsed

    def close(self) -> None:
        self._client.close()


def discover_model(url: str, *, key: str, timeout: float = 10.0) -> str:
    """The first model ``GET /v1/models`` lists, for ``--model`` left out."""
    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    try:
        resp = httpx.get(base + "/models", headers={"Authorization": f"Bearer {key}"},
                         timeout=timeout)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except Exception as exc:
        raise TimingProbeError(
            f"{base}/models did not name a model ({exc!r}); pass --model") from exc
