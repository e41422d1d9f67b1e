"""The shadow auditor: a sample of hits and fills, re-checked off the request path.

The service hands every hit and fill to :meth:`ShadowAuditor.offer`, which decides with one
random draw whether to sample it and, if so, puts it on a bounded queue without waiting. Under
load a full queue drops the sample and counts it: the auditor never slows a request. One worker
thread converts each sample (the service's event -> :class:`Sample`) and checks it:

1. provenance against the request and the registry view it was served under (scope, model,
   epoch, version, digest, material digest), and that the served answer is the stored one;
2. the registry now: serving an epoch the registry had replaced more than ``stale_grace_s``
   before the hit is ``stale`` (a replica that missed a rollout);
3. canaries: another tenant's canary in the answer;
4. recompute through the oracle: exact for deterministic requests on an exact oracle,
   teacher-forced scoring otherwise (tolerance in :mod:`audit.oracle`).

Stopping drains the queue (up to a deadline), then closes the recorder, so a normal stop loses
neither samples already taken nor findings.
"""

from __future__ import annotations

import functools
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import structlog

from keying import KeyResult, Scope

from audit import metrics
from audit.answer import Answer
from audit.checks import check_canaries, check_served, check_unreadable
from audit.errors import AuditConfigError
from audit.coverage import Coverage
from audit.facts import EntryFacts, ModelState, UnreadableEntry
from audit.finding import Draft, EntryRef, Finding
from audit.oracle import Oracle, Tolerance, recompute
from audit.recorder import Recorder

log = structlog.get_logger("audit.shadow")

EventKind = Literal["hit", "fill"]
T = TypeVar("T")


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


class RegistryView(Protocol):
    """The registry as the auditor reads it (synchronously, from its worker thread)."""

    def current(self, model: str) -> ModelState | None: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class ShadowConfig:
    """Sampling and checking settings (the service's ``[audit]`` section)."""

    sample_rate: float = 0.01
    fill_sample_rate: float = 0.01
    queue_size: int = 1024
    stale_grace_s: float = 30.0
    recompute: bool = True
    #: Share of one core's wall time the recompute may use (1.0: no limit). Recomputing is the
    #: one expensive check (a model forward pass on the service's own machine); over budget a
    #: sample still gets every other check and the recompute is counted as skipped. It is a
    #: small part of what sampling costs (bench/audit.py; figures in the README).
    recompute_budget: float = 0.01
    #: Most seconds of recompute that can be banked and spent at once (the bucket's size).
    recompute_burst_s: float = 2.0
    #: The worker sleeps this long after a sample arrives and then checks all that are queued,
    #: trading a little delay in findings for far fewer thread switches on the request path.
    batch_wait_s: float = 0.05
    tolerance: Tolerance = field(default_factory=Tolerance)
    canaries: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("sample_rate", "fill_sample_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise AuditConfigError(f"audit.{name}", f"{value!r} is not a fraction",
                                       "use a number from 0 (off) to 1 (every event), e.g. 0.01")
        if isinstance(self.queue_size, bool) or not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise AuditConfigError("audit.queue_size", f"{self.queue_size!r} is not >= 1",
                                   "use a positive number of samples, e.g. 1024")
        if not 0 < self.recompute_budget <= 1:
            raise AuditConfigError("audit.recompute_budget", f"{self.recompute_budget!r} is not in (0, 1]",
                                   "use the share of one core the recompute may use, e.g. 0.02")
        if not self.recompute_burst_s > 0:  # 0 could never bank credit: no recompute at all
            raise AuditConfigError("audit.recompute_burst_s", f"{self.recompute_burst_s!r} is not > 0",
                                   "use a number of seconds, e.g. 2")
        if not 0 <= self.batch_wait_s <= 10:
            raise AuditConfigError("audit.batch_wait_s", f"{self.batch_wait_s!r} is not in [0, 10]",
                                   "use a few hundredths of a second, e.g. 0.05 (0: no batching)")
        if not self.stale_grace_s >= 0:
            raise AuditConfigError("audit.stale_grace_s", f"{self.stale_grace_s!r} is not >= 0",
                                   "use the registry refresh bound in seconds, e.g. 30")


class ShadowAuditor(Generic[T]):
    """Samples events of type ``T``, converts them with ``convert`` and checks them off-path."""

    def __init__(
        self,
        *,
        recorder: Recorder,
        convert: Callable[[T], Sample],
        config: ShadowConfig = ShadowConfig(),
        oracle: Oracle | None = None,
        registry: RegistryView | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        event_kind: Callable[[T], EventKind] | None = None,
        timer: Callable[[], float] = time.monotonic,
        coverage: Coverage | None = None,
        save_every_s: float = 60.0,
    ) -> None:
        self._config = config
        #: What was checked, per tenant and model, and the blast radius of flagged entries;
        #: saved to the journal as the ``shadow`` result every ``save_every_s`` and at stop.
        self.coverage = coverage or Coverage(started_at=clock(), sample_rate=config.sample_rate)
        self._save_every_s = save_every_s
        self._saved_at = timer()
        self.recorder = recorder
        self._convert = convert
        self._oracle = oracle
        self._registry = registry
        self._rng = rng if rng is not None else random.Random()
        self._random = self._rng.random
        self._clock = clock
        self._event_kind = event_kind or (lambda item: getattr(item, "kind"))
        self._queue: queue.Queue[T | None] = queue.Queue(maxsize=config.queue_size)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._first_seen: dict[tuple[str, int], float] = {}
        self._timer = timer
        self._budget_since = timer()
        self._recompute_credit = config.recompute_burst_s
        self.recompute_skipped = 0
        #: CPU seconds the worker thread spent checking (what the auditor costs, read directly).
        self.worker_cpu_s = 0.0
        # Per kind: the events still to skip before the next sample (absent: no gap drawn),
        # and the skips handed to pass_over's caller, counted when that gap's sample comes.
        self._left: dict[str, int] = {}
        self._promised: dict[str, int] = {}
        # Counters (read by check_valid and the benchmark).
        self.offered = 0
        self.skipped = 0
        self.enqueued = 0
        self.dropped = 0
        self.abandoned = 0
        self.checked = 0
        self.failed = 0
        self.findings = 0
        self._m_skip = {k: metrics.SAMPLES.labels(event=k, outcome="skipped") for k in ("hit", "fill")}
        self._m_queue = {k: metrics.SAMPLES.labels(event=k, outcome="queued") for k in ("hit", "fill")}
        self._m_drop = {k: metrics.SAMPLES.labels(event=k, outcome="dropped") for k in ("hit", "fill")}
        self._m_done = {k: metrics.SAMPLES.labels(event=k, outcome="checked") for k in ("hit", "fill")}

    # -- the request path ------------------------------------------------------------------

    def offer(self, item: T, *, force: bool = False) -> bool:
        """Sample ``item`` and enqueue it without waiting; True when it was queued.

        ``force`` skips the sampling draw (an entry the service already rejected is evidence
        every time, not a sample). Never blocks and never raises into the caller.
        """
        try:
            kind = self._event_kind(item)
        except Exception:  # pragma: no cover - defensive: the request path must never see us
            log.exception("audit.shadow.offer_failed")
            return False
        return self.draw(kind, force=force) and self.enqueue(item, kind)

    @property
    def config(self) -> ShadowConfig:
        return self._config

    @config.setter
    def config(self, config: ShadowConfig) -> None:
        """A new config (new rates) takes effect at the next draw: gaps drawn at the old
        rates are dropped (skips already promised to a caller stay promised)."""
        self._config = config
        self._left.clear()

    def draw(self, kind: EventKind, *, force: bool = False) -> bool:
        """The sampling decision alone, for callers that build the event only for a sample:
        True means "build it and :meth:`enqueue` it" (or :meth:`abandon` it if that fails).
        Counted as offered, and as skipped when not drawn."""
        self.offered += 1
        if force:
            return True
        rate = self._config.sample_rate if kind == "hit" else self._config.fill_sample_rate
        if rate <= 0 or self._stopping:
            return self._skip(kind, 1)
        left = self._left.get(kind)
        if left is None:
            left = self._gap(rate)
        if left > 0:
            self._left[kind] = left - 1
            return self._skip(kind, 1)
        self._left.pop(kind, None)
        promised = self._promised.pop(kind, 0)
        if promised:
            self.offered += promised
            self._skip(kind, promised)
        return True

    def pass_over(self, kind: EventKind) -> int:
        """How many of the next events of ``kind`` will not be samples, handed to a caller
        that passes over them without calling :meth:`draw` (the service's cache counts them
        down itself, so a skipped hit runs none of the auditor's code). The event after them
        is a sample. They are counted, as offered and skipped, when that sample is drawn: the
        counters lag by at most one gap. 0: call :meth:`draw` for the next event."""
        rate = self._config.sample_rate if kind == "hit" else self._config.fill_sample_rate
        if self._stopping or not 0 < rate < 1:
            return 0
        left = self._left.get(kind)
        if left is None:
            left = self._gap(rate)
        self._left[kind] = 0
        self._promised[kind] = self._promised.get(kind, 0) + left
        return left

    def _gap(self, rate: float) -> int:
        """Events to skip before the next sample: geometric, drawn once per sample, which
        samples exactly as an independent draw per event at ``rate`` would."""
        return 0 if rate >= 1 else int(math.log1p(-self._random()) / math.log1p(-rate))

    def _skip(self, kind: str, n: int) -> bool:
        self.skipped += n
        self._m_skip.get(kind, self._m_skip["hit"]).inc(n)
        return False

    def enqueue(self, item: T, kind: EventKind | None = None) -> bool:
        """Queue a drawn sample without waiting; a full queue drops it (counted)."""
        try:
            kind = kind or self._event_kind(item)
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.dropped += 1
                self._m_drop.get(kind, self._m_drop["hit"]).inc()
                return False
            self.enqueued += 1
            self._m_queue.get(kind, self._m_queue["hit"]).inc()
            metrics.QUEUE_DEPTH.set(self._queue.qsize())
            return True
        except Exception:  # pragma: no cover - defensive: the request path must never see us
            log.exception("audit.shadow.offer_failed")
            self.abandon()
            return False

    def abandon(self) -> None:
        """A drawn sample that never reached :meth:`enqueue` (building it failed)."""
        self.abandoned += 1

    # -- the worker ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="shadow-auditor", daemon=True)
        self._thread.start()

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop taking samples, check what is queued (until ``timeout``), close the recorder."""
        self._stopping = True
        thread = self._thread
        if thread is not None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._queue.put(None, timeout=max(0.01, deadline - time.monotonic()))
                    break
                except queue.Full:
                    if time.monotonic() >= deadline:
                        break
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error("audit.shadow.stop_timeout", queued=self._queue.qsize())
            self._thread = None
        # Whatever the worker could not reach is counted as dropped, never silently lost.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.dropped += 1
                self.enqueued -= 1
        self.save_coverage()
        self.recorder.close()

    def save_coverage(self) -> None:
        """Save :attr:`coverage` as the journal's ``shadow`` result (a failure is logged)."""
        self._saved_at = self._timer()
        try:
            self.recorder.journal.save_result("shadow", self.coverage.as_dict())
        except Exception as exc:  # noqa: BLE001 - a report input, never worth failing over
            log.warning("audit.shadow.coverage_not_saved", error=repr(exc))

    def _run(self) -> None:
        wait = self.config.batch_wait_s
        while True:
            item = self._queue.get()
            if item is None:
                return
            if wait > 0 and not self._stopping:
                # NOTE: let samples gather and check them back to back: one wake-up, and one
                # GIL hand-off with the event loop, per batch instead of per sample. Measured in
                # the service at 10% sampling: 96 us of CPU per sample instead of 190.
                time.sleep(wait)
            batch = [item]
            for _ in range(self.config.queue_size):
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            metrics.QUEUE_DEPTH.set(self._queue.qsize())
            cpu = time.thread_time()
            try:
                for it in batch:
                    if it is None:  # stop()'s sentinel, always last
                        return
                    self.process(it)
            finally:
                spent = time.thread_time() - cpu
                self.worker_cpu_s += spent
                metrics.WORKER_CPU.inc(spent)
            if self._timer() - self._saved_at >= self._save_every_s:
                self.save_coverage()

    def run_once(self) -> bool:
        """Check one queued sample in the caller's thread (no worker); False when none."""
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return False
        if item is not None:
            self.process(item)
        return True

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def process(self, item: T) -> list[Finding]:
        """Convert and check one queued item; record its findings. Never raises."""
        started = time.perf_counter()
        kind = "hit"
        try:
            sample = self._convert(item)
            kind = sample.event
            found = self.check(sample)
        except Exception:
            with self._lock:
                self.failed += 1
            log.exception("audit.shadow.check_failed")
            return []
        finally:
            metrics.CHECK_SECONDS.observe(time.perf_counter() - started)
        for finding in found:
            self.recorder.record(finding)
        self.coverage.record(tenant=sample.tenant, model=sample.key.model, event=sample.event,
                             digest=sample.key.digest.hex(), scope=sample.scope.label,
                             at=sample.at, findings=found)
        with self._lock:
            self.checked += 1
            self.findings += len(found)
        self._m_done[kind].inc()
        return found

    def drain(self, *, timeout: float = 30.0) -> None:
        """Wait until the queue is empty and the worker idle (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                done = self.checked + self.failed
            if self._queue.empty() and done >= self.enqueued:
                return
            time.sleep(0.005)
        raise TimeoutError(f"shadow auditor did not drain in {timeout}s ({self._queue.qsize()} queued)")

    # -- the checks ----------------------------------------------------------------------------

    def check(self, sample: Sample) -> list[Finding]:
        """Every check on one sample; returns the findings (not yet recorded)."""
        ref = sample.ref()
        source = sample.event
        drafts: list[Draft] = []
        entry = sample.entry
        if isinstance(entry, UnreadableEntry):
            drafts += _counted("decode", check_unreadable(entry))
        elif isinstance(entry, EntryFacts):
            drafts += _counted("provenance", check_served(
                entry, key=sample.key, scope=sample.scope,
                expected_model=sample.expected.model, expected_version=sample.expected.version,
                expected_epoch=sample.expected.epoch, served=sample.served,
            ))
            drafts += _counted("registry", self._check_registry(sample, entry))
        answer = sample.served if sample.served is not None else (
            entry.answer if isinstance(entry, EntryFacts) else None)
        if answer is not None and self.config.canaries:
            drafts += _counted("canary", check_canaries(
                answer.text, owner=sample.scope, canaries=self.config.canaries))
        if answer is not None and self.config.recompute and self._oracle is not None:
            draft = self._recompute_within_budget(sample, answer)
            if draft is not None:
                drafts.append(draft)
        now = self._clock()
        return [d.stamp(source=source, entry=ref, at=now) for d in _dedupe(drafts)]

    def _check_registry(self, sample: Sample, entry: EntryFacts) -> list[Draft]:
        if self._registry is None:
            return []
        try:
            state = self._registry.current(entry.model)
        except Exception as exc:
            log.warning("audit.shadow.registry_unavailable", error=repr(exc))
            _check_counter("registry", "error").inc()
            return []
        if state is None:
            return []
        now = self._clock()
        seen = self._first_seen.setdefault((state.model, state.epoch), now)
        # NOTE: ``seen`` is when *this auditor* first saw the epoch, never earlier than the real
        # rollout, so the test below can only under-report: a hit is flagged only when the newer
        # epoch was known for longer than the grace before the hit was served.
        if entry.epoch < state.epoch and sample.at - seen > self.config.stale_grace_s:
            return [Draft(kind="stale", summary="served an epoch the registry had replaced",
                          evidence={"entry_epoch": entry.epoch, "registry_epoch": state.epoch,
                                    "replaced_for_s": round(sample.at - seen, 3),
                                    "grace_s": self.config.stale_grace_s})]
        return []

    def _recompute_within_budget(self, sample: Sample, cached: Answer) -> Draft | None:
        c = self.config
        now = self._timer()
        if c.recompute_budget < 1:
            # A token bucket of recompute seconds: it fills at recompute_budget per second and
            # holds at most recompute_burst_s, so idle time never banks more than one burst.
            self._recompute_credit = min(
                c.recompute_burst_s,
                self._recompute_credit + c.recompute_budget * (now - self._budget_since))
            self._budget_since = now
            if self._recompute_credit <= 0:
                self.recompute_skipped += 1
                _check_counter("recompute", "skipped_budget").inc()
                return None
        try:
            return self._recompute(sample, cached)
        finally:
            self._recompute_credit -= self._timer() - now

    def _recompute(self, sample: Sample, cached: Answer) -> Draft | None:
        assert self._oracle is not None
        kind = sample.key.canonical.kind
        if kind not in ("chat", "completion"):
            _check_counter("recompute", "undecided").inc()
            return None
        out = recompute(self._oracle, sample.request, kind, cached,
                        deterministic=sample.key.cacheability.reproducible, tenant=sample.tenant,
                        tolerance=self.config.tolerance)
        if out.verdict == "error":
            log.warning("audit.shadow.oracle_failed", error=out.error)
            _check_counter("recompute", "error").inc()
            return None
        _check_counter(f"recompute_{out.check}", out.verdict).inc()
        return out.draft

    def check_valid(self) -> None:
        """Counters add up and the queue is within its bound."""
        assert self._queue.qsize() <= self.config.queue_size
        assert self.offered == self.skipped + self.enqueued + self.dropped + self.abandoned, (
            self.offered, self.skipped, self.enqueued, self.dropped, self.abandoned)
        assert self.checked + self.failed <= self.enqueued
        assert self.findings >= 0
        self.coverage.check_valid()


def _counted(check: str, drafts: list[Draft]) -> list[Draft]:
    _check_counter(check, "finding" if drafts else "pass").inc()
    return drafts


@functools.lru_cache(maxsize=256)
def _check_counter(check: str, result: str) -> Any:
    # NOTE: labels() takes a lock and builds a key on every call; the children are few.
    return metrics.CHECKS.labels(check=check, result=result)


def _dedupe(drafts: list[Draft]) -> list[Draft]:
    seen: set[tuple[str, str]] = set()
    out = []
    for d in drafts:
        if (d.kind, d.summary) not in seen:
            seen.add((d.kind, d.summary))
            out.append(d)
    return out
