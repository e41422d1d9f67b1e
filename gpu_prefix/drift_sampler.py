"""Drift sampling in the background: a seeded share of finished INT8 generations is re-run,
teacher-forced over its prompt and completion, with full-precision KV and with INT8 KV, and the
next-token distributions compared (``gpu_prefix.drift``'s KLD and top-1 agreement, by the same
position buckets). Running figures over the last samples feed the same guard as the on-demand
audit (``drift.check`` then ``drift.enforce``): over the model's thresholds, INT8 goes off for the
layers the per-layer errors single out, or for the model.

It never competes with serving for long:

- a budget: sampled requests cost their tokens from a bucket refilled at ``tokens_per_minute``;
  one that does not fit is skipped and counted (``skipped_budget``), as is one that finds the
  bounded queue full (``skipped_queue``); offering runs on the scheduler's thread and is a coin
  toss and an append;
- a replay runs in chunks of ``chunk_tokens`` on its own thread, each chunk between two scheduler
  steps (the scheduler is paused for it) and only once the engine is idle, or has been busy for
  ``busy_wait_s``: a request waits at most one chunk, and only under sustained load.

A replay quantizes in scratch storage made like the pool's (``QuantizedKV.like``: the same code,
scale rules and full-precision layers), not in the pool's live blocks, and runs the engine's own
attention over it (``attention.packed_forward``); the full-precision side runs the same code over a
full-precision scratch pool. Unlike the audit, it is teacher-forced on the request's own (INT8)
completion, the only one it has.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
import torch

from gpu_prefix.attention import StepLayout, packed_forward, seq_slice
from gpu_prefix.drift import (
    BUCKETS,
    DriftReport,
    Figures,
    LayerErrorSum,
    check,
    enforce,
    kld_top1,
    thresholds_for,
)
from gpu_prefix.errors import InvalidParamsError
from gpu_prefix.kvquant import QuantizedKV

if TYPE_CHECKING:
    from gpu_prefix.engine import Engine

log = structlog.get_logger()


@dataclass(frozen=True, kw_only=True, slots=True)
class DriftSamplerConfig:
    """How much of the traffic the sampler re-runs, and what it may spend doing so."""

    #: Share of finished INT8 generations sampled (0: off).
    rate: float = 0.0
    #: Tokens (prompt + completion, each run twice: INT8 and full precision) replayed per minute
    #: at most; the bucket holds one minute's worth.
    tokens_per_minute: int = 20_000
    #: Sampled requests waiting for their replay; past it, skipped.
    max_queue: int = 8
    #: Tokens one replay chunk runs between two scheduler steps.
    chunk_tokens: int = 256
    #: A chunk waits this long for an idle engine, then runs between two steps anyway.
    busy_wait_s: float = 1.0
    #: The running figures cover the last this many sampled positions of each bucket.
    window_tokens: int = 4096
    seed: int = 0

    def check(self, block_size: int) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise InvalidParamsError("drift_sample_rate", f"must be in [0, 1], got {self.rate}",
                                     "use e.g. 0.01")
        for name, value in (("drift_sample_tokens_per_minute", self.tokens_per_minute),
                            ("drift_sample_queue", self.max_queue),
                            ("drift_sample_window", self.window_tokens)):
            if value < 1:
                raise InvalidParamsError(name, f"must be at least 1, got {value}",
                                         "see docs/int8.md")
        if self.chunk_tokens < block_size:
            raise InvalidParamsError("drift_sample_chunk_tokens",
                                     f"must be at least one block ({block_size})",
                                     f"use a multiple of {block_size}, e.g. 256")
        if self.busy_wait_s < 0:
            raise InvalidParamsError("drift_sample_busy_wait_s",
                                     f"must be >= 0, got {self.busy_wait_s}", "use 1.0")


@dataclass(frozen=True, kw_only=True, slots=True)
class DriftSamplerStats:
    offered: int  # finished INT8 generations seen
    chosen: int  # picked by the seeded coin toss (then queued or skipped)
    sampled: int  # replayed and measured
    skipped_budget: int
    skipped_queue: int
    dropped: int  # queued when INT8 went off for the model, or failed
    trips: int  # times the running figures crossed the thresholds
    queued: int
    replay_tokens: int  # tokens replayed (each run twice)
    busy_chunks: int  # chunks run while requests were in flight (after busy_wait_s)
    figures: dict[str, Figures]  # running figures: "all" and each bucket
    exceeded: list[str]


@dataclass(frozen=True, kw_only=True, slots=True)
class _Sample:
    tokens: tuple[int, ...]
    prompt_len: int
    model: Any


class _Replay:
    """One sample's teacher-forced run, chunk by chunk, with full-precision and INT8 KV in
    scratch pools of its own (positions ``0..n-1``; the last token never runs)."""

    def __init__(self, engine: Engine, sample: _Sample, like: QuantizedKV, chunk: int) -> None:
        self.sample = sample
        self.bs = bs = like.block_size
        self.chunk = max(bs, chunk // bs * bs)
        self.device = engine.device
        n = len(sample.tokens)
        self.blocks = -(-n // bs)
        sh = engine.shape
        self.full = torch.zeros((sh.num_layers, 2, sh.kv_heads, self.blocks * bs, sh.head_dim),
                                dtype=sh.dtype,
                                device=self.device)
        self.quant = like.like(self.blocks)
        self.end = n - 1
        self.at = 0
        self.rows: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    @property
    def done(self) -> bool:
        return self.at >= self.end

    def step(self) -> int:
        """Run the next chunk on both sides; returns its tokens."""
        a = self.at
        b = min(self.end, a + self.chunk)
        tokens = self.sample.tokens
        layout = StepLayout(write_slots=torch.arange(a, b, device=self.device),
                            seqs=(seq_slice(q_start=0, q_len=b - a, ctx_len=b,
                                            table=list(range(self.blocks)),
                                            block_size=self.bs, device=self.device),))
        keep = [p - a for p in range(max(a, self.sample.prompt_len - 1), b)]
        with torch.inference_mode():
            for side, (pool, quant) in enumerate(((self.full, None),
                                                  (self.quant.codes, self.quant))):
                if keep:
                    self.rows[side].append(packed_forward(self.sample.model, pool, tokens[a:b],
                                                          range(a, b), layout,
                                                          keep, quant).float())
                else:
                    packed_forward(self.sample.model, pool, tokens[a:b], range(a, b), layout,
                                   [b - 1 - a], quant)
        self.at = b
        return b - a

    def result(self) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per completion position: KLD and top-1 agreement; and the full-precision K/V per layer
        (for the per-layer errors)."""
        kld, agree = kld_top1(torch.cat(self.rows[0]), torch.cat(self.rows[1]))
        kv = [(self.full[i, 0, :, : self.end],
               self.full[i, 1, :, : self.end]) for i in range(len(self.full))]
        return kld, agree, kv


class DriftSampler:
    """Takes finished INT8 generations (``offer``), replays a budgeted sample on its own
    thread, keeps running figures, and trips the guard when they cross the thresholds."""

    def __init__(self, engine: Engine, config: DriftSamplerConfig, *,
                 clock: Callable[[], float] = time.monotonic,
                 on_trip: Callable[[DriftReport], None] | None = None) -> None:
        config.check(engine.pool.block_size)
        self.engine = engine
        self.config = config
        #: Called with the report after a trip (the service records it as a ``drift`` finding).
        self.on_trip = on_trip
        self._clock = clock
        self._rng = random.Random(config.seed)
        self._level = float(config.tokens_per_minute)
        self._refilled = clock()
        self._cond = threading.Condition()
        self._queue: deque[_Sample] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._replaying = False
        self._windows: dict[str,
                            deque[tuple[torch.Tensor, torch.Tensor]]] = {
                                name: deque() for name, _, _ in BUCKETS}
        #: The windows' figures as last computed (by ``_judge``, when they change), for ``stats``.
        self._last_figures = self._figures()
        self._offered = self._chosen = self._sampled = 0
        self._skipped_budget = self._skipped_queue = 0
        self._dropped = self._trips = self._replay_tokens = self._busy_chunks = 0
        self._exceeded: list[str] = []

    # -- the scheduler's side -------------------------------------------------------------------

    def offer(self, prompt: Sequence[int], completion: Sequence[int], *, model: Any) -> None:
        """A finished generation: sample it (seeded), within the budget and the queue's bound."""
        if self.engine.kv_dtype != "int8":
            return
        with self._cond:
            if self._stopping:
                return
            self._offered += 1
            if self._rng.random() >= self.config.rate:
                return
            self._chosen += 1
            cost = len(prompt) + len(completion)
            now = self._clock()
            per_s = self.config.tokens_per_minute / 60.0
            self._level = min(float(self.config.tokens_per_minute),
                              self._level + (now - self._refilled) * per_s)
            self._refilled = now
            if cost > self._level:
                self._skipped_budget += 1
                return
            if len(self._queue) >= self.config.max_queue:
                self._skipped_queue += 1
                return
            self._level -= cost
            self._queue.append(_Sample(tokens=tuple(prompt) + tuple(completion),
                                       prompt_len=len(prompt), model=model))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="drift-sampler",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drop_queued(self) -> None:
        """INT8 is off for the model: nothing left to sample."""
        with self._cond:
            self._dropped += len(self._queue)
            self._queue.clear()

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def wait_drained(self, timeout: float) -> bool:
        """Wait until no sample is queued or replaying (tests, benchmarks); True when drained."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._replaying,
                                       timeout=timeout)

    def stats(self) -> DriftSamplerStats:
        with self._cond:
            return DriftSamplerStats(
                offered=self._offered, chosen=self._chosen, sampled=self._sampled,
                skipped_budget=self._skipped_budget,
                skipped_queue=self._skipped_queue, dropped=self._dropped, trips=self._trips,
                queued=len(self._queue),
                replay_tokens=self._replay_tokens, busy_chunks=self._busy_chunks,
                figures=dict(self._last_figures),
                exceeded=list(self._exceeded))

    # -- the sampler's thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    self._thread = None
                    return
                sample = self._queue.popleft()
                self._replaying = True
            try:
                self._replay(sample)
            except Exception:  # a failed replay must not stop sampling
                log.exception("drift_sampler.replay_failed", tokens=len(sample.tokens))
                with self._cond:
                    self._dropped += 1
            finally:
                with self._cond:
                    self._replaying = False
                    self._cond.notify_all()

    def _replay(self, sample: _Sample) -> None:
        engine = self.engine
        quant = engine.pool.quant
        if engine.kv_dtype != "int8" or quant is None:
            with self._cond:
                self._dropped += 1
            return
        replay = _Replay(engine, sample, quant, self.config.chunk_tokens)
        storage = quant.key
        while not replay.done:
            if self._stopping:
                return
            idle = engine.scheduler.wait_idle(self.config.busy_wait_s)
            # NOTE: between two steps: the scheduler runs no forward while paused, so a chunk never
            # shares the device with a step, and a request waits at most one chunk.
            with engine.scheduler.paused():
                n = replay.step()
            with self._cond:
                self._replay_tokens += n
                self._busy_chunks += 0 if idle else 1
        kld, agree, kv = replay.result()
        self._judge(kld, agree, kv, replay.quant, storage)

    def _figures(self) -> dict[str, Figures]:
        out = {}
        for name, window in self._windows.items():
            out[name] = (Figures.of(torch.cat([k for k, _ in window]),
                                    torch.cat([g for _, g in window]))
                         if window else Figures.of(torch.empty(0), torch.empty(0)))
        parts = [p for w in self._windows.values() for p in w]
        every = (Figures.of(torch.cat([k for k, _ in parts]), torch.cat([g for _, g in parts]))
                 if parts else Figures.of(torch.empty(0), torch.empty(0)))
        return {"all": every, **out}

    def _judge(self, kld: torch.Tensor, agree: torch.Tensor,
               kv: list[tuple[torch.Tensor, torch.Tensor]], like: QuantizedKV,
               storage: str) -> None:
        """Add a replay's figures to the windows and check them; on a trip, the per-layer errors
        of its full-precision K/V (quantized by ``like``'s rules) go in the guard's report."""
        engine = self.engine
        thresholds = thresholds_for(engine.model_id, engine.drift_thresholds)
        with self._cond:
            if engine.pool.quant is None or engine.pool.quant.key != storage:
                # INT8 storage changed while this replayed: its figures describe what is gone.
                self._dropped += 1
                return
            self._sampled += 1
            for name, a, b in BUCKETS:
                if len(kld[a:b]):
                    window = self._windows[name]
                    window.append((kld[a:b], agree[a:b]))
                    while sum(len(k) for k, _ in window) - len(
                        window[0][0]) >= self.config.window_tokens:
                        window.popleft()
            figures = self._last_figures = self._figures()
            self._exceeded = check(figures, thresholds)
            if not self._exceeded:
                return
            self._trips += 1
            sampled, exceeded = self._sampled, self._exceeded
            # The storage changes now: figures measured on the old one no longer apply.
            for window in self._windows.values():
                window.clear()
            self._last_figures = self._figures()
            self._exceeded = []
        # NOTE: only a trip needs the per-layer errors (a quantize and dequantize of every
        # layer's K/V), so they are measured here, off the lock.
        errors = LayerErrorSum(like)
        errors.add(kv)
        report = DriftReport(
            model=engine.model_id, kv_dtype=storage, prompts=sampled, max_tokens=0,
            overall=figures["all"], buckets={k: v for k, v in figures.items() if k != "all"},
            first_divergence=[],
            layers=errors.result(), thresholds=thresholds, exceeded=exceeded,
            source="sampler")
        report = enforce(engine, report)
        log.warning("drift_sampler.trip", model=engine.model_id, action=report.action,
                    exceeded=report.exceeded)
        if self.on_trip is not None:
            self.on_trip(report)
