"""The shadow auditor: a sample of hits and fills, re-checked off the request path.

The service asks :meth:`ShadowAuditor.draw` (the :class:`~audit.sampler.Sampler`'s geometric
gap, drawn once per sample) or counts down :meth:`~ShadowAuditor.pass_over` itself, and hands
each drawn event to :meth:`~ShadowAuditor.enqueue`, which puts it on a bounded queue without
waiting. Under load a full queue drops the sample and counts it: the auditor never slows a
request. One worker thread converts each sample (the service's event -> :class:`Sample`) and
runs every check on it (:class:`~audit.shadow_checks.SampleChecker`).

Stopping drains the queue (up to a deadline), then closes the recorder, so a normal stop loses
neither samples already taken nor findings.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable
from operator import attrgetter
from typing import Generic, TypeVar, get_args

import structlog

from audit import metrics
from audit.counts import ShadowCounts
from audit.coverage import Coverage
from audit.finding import Finding
from audit.protocols import Oracle, RegistryView
from audit.recorder import Recorder
from audit.sample import EventKind, Sample
from audit.sampler import Sampler
from audit.shadow_checks import SampleChecker
from audit.shadow_config import ShadowConfig

log = structlog.get_logger("audit.shadow")

T = TypeVar("T")

__all__ = ["ShadowAuditor"]


def _counter(name: str) -> property:
    return property(lambda self: getattr(self.counts, name),
                    doc=f"``counts.{name}`` (see :class:`~audit.counts.ShadowCounts`).")


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
        self.counts = ShadowCounts()
        self.sampler = Sampler(config, self.counts, rng if rng is not None else random.Random())
        self.checker = SampleChecker(config, self.counts, oracle=oracle, registry=registry,
                                     clock=clock, timer=timer)
        #: The sampling decision alone, for callers that build the event only for a sample:
        #: True means "build it and :meth:`enqueue` it" (or :meth:`abandon` it if that fails).
        self.draw = self.sampler.draw
        #: How many following events of a kind the caller may pass over without asking.
        self.pass_over = self.sampler.pass_over
        #: What was checked, per tenant and model, and the blast radius of flagged entries;
        #: saved to the journal as the ``shadow`` result every ``save_every_s`` and at stop.
        self.coverage = coverage or Coverage(started_at=clock(), sample_rate=config.sample_rate)
        self.recorder = recorder
        self._convert = convert
        #: Hit or fill: by default the event's ``kind`` (the service's ``CacheEvent.kind``).
        self._event_kind: Callable[[T], EventKind] = event_kind or attrgetter("kind")
        self._save_every_s = save_every_s
        self._timer = timer
        self._saved_at = timer()
        self._queue: queue.Queue[T | None] = queue.Queue(maxsize=config.queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Bound once: the request path indexes a dict instead of asking metrics.child.
        self._m_queued, self._m_dropped, self._m_checked = (
            {k: metrics.child(metrics.SAMPLES, k, outcome) for k in get_args(EventKind)}
            for outcome in ("queued", "dropped", "checked"))

    offered = _counter("offered")
    skipped = _counter("skipped")
    enqueued = _counter("enqueued")
    dropped = _counter("dropped")
    abandoned = _counter("abandoned")
    checked = _counter("checked")
    failed = _counter("failed")
    findings = _counter("findings")
    recompute_skipped = _counter("recompute_skipped")
    worker_cpu_s = _counter("worker_cpu_s")

    @property
    def config(self) -> ShadowConfig:
        return self.sampler.config

    @config.setter
    def config(self, config: ShadowConfig) -> None:
        """A new config (new rates) takes effect at the next draw."""
        self.sampler.config = self.checker.config = config

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

    def enqueue(self, item: T, kind: EventKind) -> bool:
        """Queue a drawn sample without waiting; a full queue drops it (counted)."""
        try:
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.counts.dropped += 1
                self._m_dropped[kind].inc()
                return False
            self.counts.enqueued += 1
            self._m_queued[kind].inc()
            metrics.QUEUE_DEPTH.set(self._queue.qsize())
            return True
        except Exception:  # pragma: no cover - defensive: the request path must never see us
            log.exception("audit.shadow.offer_failed")
            self.abandon()
            return False

    def abandon(self) -> None:
        """A drawn sample that never reached :meth:`enqueue` (building it failed)."""
        self.counts.abandoned += 1

    # -- the worker ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self.sampler.closed = False
        self._thread = threading.Thread(target=self._run, name="shadow-auditor", daemon=True)
        self._thread.start()

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop taking samples, check what is queued (until ``timeout``), close the recorder."""
        self.sampler.closed = True  # also what tells the worker it is stopping
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
                self.counts.dropped += 1
                self.counts.enqueued -= 1
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
            if wait > 0 and not self.sampler.closed:
                # NOTE: let samples gather and check them back to back: one wake-up, and one
                # GIL hand-off with the event loop, per batch instead of per sample (what it
                # saves: ``python bench/audit.py``).
                time.sleep(wait)
            batch: list[T | None] = [item]
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
                self.counts.worker_cpu_s += spent
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

    def check(self, sample: Sample) -> list[Finding]:
        """Every check on one sample; returns the findings (not yet recorded)."""
        return self.checker.check(sample)

    def process(self, item: T) -> list[Finding]:
        """Convert and check one queued item; record its findings. Never raises."""
        started = time.perf_counter()
        try:
            sample = self._convert(item)
            found = self.checker.check(sample)
        except Exception:
            with self._lock:
                self.counts.failed += 1
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
            self.counts.checked += 1
            self.counts.findings += len(found)
        self._m_checked[sample.event].inc()
        return found

    def drain(self, *, timeout: float = 30.0) -> None:
        """Wait until the queue is empty and the worker idle (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                done = self.counts.checked + self.counts.failed
            if self._queue.empty() and done >= self.counts.enqueued:
                return
            time.sleep(0.005)
        raise TimeoutError(f"shadow auditor did not drain in {timeout}s ({self._queue.qsize()} "
                           "queued)")

    def check_valid(self) -> None:
        """Counters add up and the queue is within its bound."""
        assert self._queue.qsize() <= self.config.queue_size
        self.counts.check_valid()
        self.coverage.check_valid()
