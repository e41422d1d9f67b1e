"""The continuous-batching scheduler: one forward per step over a packed batch, attention reading
the pool in place.

Each step (one thread runs them) takes, under a token budget (``max_batch_tokens``):

1. one token of every running sequence that has exactly one token to run (a decode), oldest
   admitted first;
2. then prefill chunks of running sequences with more to run, oldest first. A chunk that does not
   finish its prompt ends on a block boundary, so the blocks it fills can be indexed at once, and
   a long prompt is split over steps: it never stalls the others' decodes (chunked prefill).

New requests are admitted at the next step, finished ones leave at once. Memory:

- admission at the pool's high watermark: a request is admitted while fewer than
  ``max_running`` run and the blocks running requests hold (or still need for the tokens they
  know) plus its prompt's blocks stay under ``high_watermark`` of the pool; otherwise it waits
  in a bounded FIFO queue, and past the bound or its wait timeout it is refused with
  ``AdmissionRefusedError`` (retryable);
- a running request that needs a block when none is free or evictable preempts the most recently
  admitted request (itself, if it is the newest): that one's private blocks are freed, its
  indexed blocks stay cached, and it is requeued first in line, to be recomputed from its tokens
  so far (it usually matches its own cached blocks again). Nothing pinned is evicted and no
  allocation fails past this point;
- a request that could never fit (prompt plus ``max_tokens`` over the watermark's blocks) is
  refused up front, so preemption always frees enough for the oldest request to progress.

Prefix sharing: when a request starts (and before each chunk) it extends its matched prefix
from the index; two requests that would compute the same block in one step do not: the later
one waits a step and matches the block the earlier one indexed.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
import torch

from gpu_prefix.attention import SeqSlice, StepLayout, packed_forward, seq_slice
from gpu_prefix.errors import AdmissionRefusedError, InvalidParamsError
from gpu_prefix.hashing import BlockKeys, extend_chain
from gpu_prefix.store import ChainItem, Lease, PrefixStore

log = structlog.get_logger()

#: Upper bounds (seconds) of the time-to-first-token and step-time histograms.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Histogram:
    """Counts per upper bound (not cumulative), their sum and count: what a Prometheus
    histogram needs, kept here so ``gpu_prefix`` needs no metrics library."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.count += 1


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerConfig:
    """The scheduler's limits; see the README's engine section for the trade-offs."""

    max_running: int = 8
    max_batch_tokens: int = 512
    max_queue: int = 64
    queue_timeout_s: float = 30.0
    high_watermark: float = 0.8

    def check(self, block_size: int) -> None:
        if not 0.0 < self.high_watermark <= 1.0:
            raise InvalidParamsError("high_watermark",
                                     f"must be in (0, 1], got {self.high_watermark}", "use 0.8")
        if self.max_queue < 0 or self.max_running < 1:
            raise InvalidParamsError("max_queue/max_running",
                                     "max_queue >= 0 and max_running >= 1", "use 64 and 8")
        if self.max_batch_tokens < self.max_running + block_size:
            raise InvalidParamsError(
                "max_batch_tokens",
                f"{self.max_batch_tokens} leaves no room for a prefill chunk of one block "
                f"({block_size} tokens) "
                f"beside {self.max_running} decodes",
                f"use at least max_running + block_size = {self.max_running + block_size}",
            )
        if self.queue_timeout_s <= 0:
            raise InvalidParamsError("queue_timeout_s", f"must be > 0, got {self.queue_timeout_s}",
                                     "use 30")


@dataclass(frozen=True, kw_only=True, slots=True)
class SchedulerStats:
    running: int
    queued: int
    admitted_total: int
    refused_total: int
    preempted_total: int
    finished_total: int
    steps_total: int
    step_tokens_total: int
    last_step_tokens: int
    last_step_seqs: int
    limit_blocks: int
    ttft: Histogram
    step_time: Histogram


class Seq:
    """A request as the scheduler runs it. Subclasses say which positions' logits they need and
    what to do with them (``gpu_prefix.engine``'s generation, scoring and logits requests).

    ``tokens`` holds every token known: the prompt, then each token sampled (a sampled token's
    K/V is computed by the next step). ``computed`` tokens have their K/V in the lease's blocks.
    """

    def __init__(self, tokens: Sequence[int], *, keys: BlockKeys | None, model: Any,
                 max_total: int) -> None:
        self.tokens = list(tokens)
        self.keys = keys
        self.model = model
        self.max_total = max_total
        self.chain: list[ChainItem] = []
        self.lease: Lease | None = None
        self.computed = 0
        self.cached_tokens: int | None = None
        self.admit_no = 0
        self.arrived = 0.0
        self.deadline: float | None = None
        self.first_output_at: float | None = None
        self.cancelled = False

    def first_logit_pos(self) -> int:
        """The first position whose logits this request still needs: no cached block may cover
        it, since only a run position yields logits."""
        return len(self.tokens) - 1

    def logit_positions(self, a: int, b: int) -> list[int]:
        """Positions in ``[a, b)`` whose logits this request needs from a step that runs them."""
        return [b - 1] if b == len(self.tokens) else []

    def on_logits(self, positions: list[int], rows: torch.Tensor) -> bool:
        """Take the logits of ``positions``; returns True when the request is finished."""
        raise NotImplementedError

    def on_finished(self) -> None:
        """Called once its blocks are released after ``on_logits`` said it is finished."""

    def on_failed(self, exc: BaseException) -> None:
        """Called once when it ends without finishing (refused, or the forward raised)."""


class Scheduler:
    """Queues, admits, steps and preempts sequences over one ``PrefixStore``."""

    def __init__(self, store: PrefixStore, config: SchedulerConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic, idle_exit_s: float = 5.0) -> None:
        self.store = store
        self.config = config or SchedulerConfig()
        self.block_size = store.block_size
        self.config.check(self.block_size)
        self.limit = max(1, int(self.config.high_watermark * store.pool.num_blocks))
        self._clock = clock
        self._idle_exit_s = idle_exit_s
        self._cond = threading.Condition(threading.RLock())
        self._running: list[Seq] = []
        self._waiting: deque[Seq] = deque()
        self._admit_nos = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._paused = 0
        self._executing = False
        self._stopping = False
        self._admitted = self._refused = self._preempted = self._finished = 0
        self._steps = self._step_tokens = self._last_tokens = self._last_seqs = 0
        self._ttft = Histogram(TTFT_BUCKETS)
        self._step_time = Histogram(STEP_BUCKETS)
        _LIVE.add(self)

    # -- the caller's side ----------------------------------------------------------------------

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def submit(self, seq: Seq, *, queue_timeout_s: float | None = None) -> None:
        """Admit ``seq`` now, or queue it; raises ``AdmissionRefusedError`` (retryable) when the
        queue is full, ``InvalidParamsError`` when it could never fit."""
        need = self.blocks_for(seq.max_total)
        if need > self.limit:
            raise InvalidParamsError(
                "max_tokens",
                f"the prompt and max_tokens ({seq.max_total} tokens) need {need} KV blocks; this "
                "engine runs at "
                f"most {self.limit} ({self.config.high_watermark:.0%} of its "
                f"{self.store.pool.num_blocks}-block pool)",
                "lower max_tokens, shorten the prompt, or give the engine a larger pool",
            )
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            now = self._clock()
            seq.arrived = now
            seq.deadline = now + (
                self.config.queue_timeout_s if queue_timeout_s is None else queue_timeout_s)
            if not self._waiting and self._fits(seq):
                self._admit(seq)
            elif len(self._waiting) >= self.config.max_queue:
                self._refused += 1
                raise AdmissionRefusedError(
                    f"KV pool above its high watermark ({self.store.held_blocks()}/{self.limit} "
                    "blocks held, "
                    f"{len(self._running)} running) and the wait queue is full "
                    f"({self.config.max_queue}); retry later",
                    retry_after_s=1.0,
                )
            else:
                self._waiting.append(seq)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="engine-scheduler",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop after its current step; requests still queued or running fail."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def cancel(self, seq: Seq) -> None:
        """Stop ``seq`` (its consumer went away); its blocks are released at the next step."""
        with self._cond:
            seq.cancelled = True
            self._cond.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the scheduler between steps (for operations and tests that inspect a frozen
        state); requests keep their blocks and resume afterwards."""
        with self._cond:
            self._paused += 1
            while self._executing:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def stats(self) -> SchedulerStats:
        with self._cond:
            return SchedulerStats(
                running=len(self._running), queued=len(self._waiting),
                admitted_total=self._admitted,
                refused_total=self._refused, preempted_total=self._preempted,
                finished_total=self._finished,
                steps_total=self._steps, step_tokens_total=self._step_tokens,
                last_step_tokens=self._last_tokens,
                last_step_seqs=self._last_seqs, limit_blocks=self.limit,
                ttft=Histogram(self._ttft.buckets, list(self._ttft.counts), self._ttft.total,
                               self._ttft.count),
                step_time=Histogram(self._step_time.buckets, list(self._step_time.counts),
                                    self._step_time.total,
                                    self._step_time.count),
            )

    def replace_store(self, make_store: Callable[[], PrefixStore]) -> None:
        """Move to a new store (the engine turning INT8 off, for the model or some layers):
        between steps, every running request is preempted (recomputed later, as after any
        preemption, with block keys of the new pool's KV dtype), and the old store is let go
        before ``make_store`` allocates the new one. Requests that can never fit the new store
        fail with a clear error."""
        with self.paused(), self._cond:
            for seq in list(self._running):
                self._preempt(seq)
            self.store = make_store()
            self.limit = max(1, int(self.config.high_watermark * self.store.pool.num_blocks))
            for seq in list(self._waiting):
                if self.blocks_for(seq.max_total) > self.limit:
                    self._waiting.remove(seq)
                    seq.on_failed(InvalidParamsError(
                        "max_tokens",
                        f"the engine's KV pool shrank to {self.limit} blocks under its watermark "
                        "(INT8 KV turned off); this request no longer fits",
                        "retry with a lower max_tokens"))
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for no request to run or wait (background work that
        should not compete with serving waits here); True when idle."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._running or self._waiting),
                                       timeout=timeout)

    # -- admission and preemption (under the lock) ----------------------------------------------

    def _fits(self, seq: Seq) -> bool:
        """Room under the watermark for ``seq``'s known tokens, beside what running requests
        hold and what their known tokens still need (admitted, not yet computed)."""
        if len(self._running) >= self.config.max_running:
            return False
        owed = sum(max(0, self.blocks_for(len(s.tokens)) - len(s.lease.table))
                   for s in self._running if s.lease is not None)
        return self.store.held_blocks() + owed + self.blocks_for(len(seq.tokens)) <= self.limit

    def _admit(self, seq: Seq) -> None:
        if seq.admit_no == 0:
            self._admitted += 1  # a preempted request's return is not a new admission
        kv_dtype = self.store.pool.kv_key
        if seq.keys is not None and seq.keys.kv_dtype != kv_dtype:
            # NOTE: the KV dtype in a block's hash names how the pool stores it; a request keyed
            # before the engine turned INT8 off must not index full-precision K/V as INT8.
            seq.keys = replace(seq.keys, kv_dtype=kv_dtype)
            seq.chain = []
        seq.lease = self.store.open(indexing=seq.keys is not None)
        seq.computed = 0
        seq.admit_no = next(self._admit_nos)
        seq.deadline = None
        self._running.append(seq)
        self._rematch(seq)

    def _chain(self, seq: Seq, upto: int) -> list[ChainItem]:
        assert seq.keys is not None
        return extend_chain(seq.chain, seq.tokens, seq.keys, block_size=self.block_size, upto=upto)

    def _rematch(self, seq: Seq) -> None:
        """Extend the sequence's cached prefix from the index (blocks other requests indexed
        since), while it holds no private block, up to the first position whose logits it needs
        (a generation's last token: at least one token always runs)."""
        lease = seq.lease
        assert lease is not None
        if not lease.indexing or lease.private:
            return
        usable = seq.first_logit_pos() // self.block_size
        if usable <= len(lease.pinned):
            return
        self.store.match(lease, self._chain(seq, usable))
        seq.computed = len(lease.pinned) * self.block_size
        if seq.first_output_at is None:  # prompt tokens served from the cache, not recomputed
            seq.cached_tokens = max(seq.cached_tokens or 0, seq.computed)

    def _preempt(self, seq: Seq) -> None:
        assert seq.lease is not None
        self.store.release(seq.lease)
        seq.lease = None
        seq.computed = 0
        self._running.remove(seq)
        self._waiting.appendleft(seq)
        self._preempted += 1
        log.info("engine.preempt", tokens=len(seq.tokens), running=len(self._running))

    def _grow(self, seq: Seq, upto: int, plan: list[tuple[Seq, int, int]]) -> bool:
        """Give ``seq`` blocks for its first ``upto`` tokens, preempting the newest requests
        (never an older one) when none is free or evictable. False: ``seq`` itself was."""
        lease = seq.lease
        assert lease is not None
        while len(lease.table) * self.block_size < upto:
            if self.store.allocate(lease) is not None:
                continue
            newer = [s for s in self._running if s.admit_no > seq.admit_no]
            victim = max(newer, key=lambda s: s.admit_no) if newer else seq
            self._preempt(victim)
            plan[:] = [p for p in plan if p[0] is not victim]
            if victim is seq:
                return False
        return True

    def _end(self, seq: Seq) -> None:
        if seq.lease is not None:
            self.store.release(seq.lease)
            seq.lease = None
        if seq in self._running:
            self._running.remove(seq)

    def _plan(self) -> list[tuple[Seq, int, int]]:
        now = self._clock()
        for seq in [s for s in self._running if s.cancelled]:
            self._end(seq)
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
        for seq in [s for s in self._waiting if s.deadline is not None and now > s.deadline]:
            self._waiting.remove(seq)
            self._refused += 1
            seq.on_failed(AdmissionRefusedError(
                f"waited {now - seq.arrived:.1f} s for KV pool room without getting it; retry "
                "later",
                retry_after_s=1.0))
        while self._waiting and self._fits(self._waiting[0]):
            self._admit(self._waiting.popleft())

        bs = self.block_size
        budget = self.config.max_batch_tokens
        plan: list[tuple[Seq, int, int]] = []
        computing: set[object] = set()
        for seq in list(self._running):
            if budget <= 0:
                break
            if seq in self._running and len(seq.tokens) - seq.computed == 1 and self._grow(
                seq, seq.computed + 1, plan):
                plan.append((seq, seq.computed, seq.computed + 1))
                budget -= 1
        for seq in list(self._running):
            if budget <= 0:
                break
            if seq not in self._running or len(seq.tokens) - seq.computed <= 1 or any(
                p[0] is seq for p in plan):
                continue
            self._rematch(seq)
            pending = len(seq.tokens) - seq.computed
            n = min(pending, budget)
            if n < pending:
                n = (seq.computed + n) // bs * bs - seq.computed
            if n <= 0:
                continue
            assert seq.lease is not None
            if seq.lease.indexing:
                first, last = seq.computed // bs, (seq.computed + n) // bs
                hashes = [item[0] for item in self._chain(seq, last)[first:last]]
                if any(h in computing for h in hashes):
                    continue  # another request computes these blocks now: match them next step
                computing.update(hashes)
            if self._grow(seq, seq.computed + n, plan):
                plan.append((seq, seq.computed, seq.computed + n))
                budget -= n
        return plan

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    self._fail_all(RuntimeError("the engine shut down before this request "
                                                "finished"))
                    self._thread = None
                    return
                idle_since = self._clock()
                while not self._stopping and (self._paused or not (self._running or self._waiting)):
                    self._cond.wait(timeout=self._idle_exit_s)
                    if (not self._paused and not (self._running or self._waiting)
                            and self._clock() - idle_since >= self._idle_exit_s):
                        self._thread = None  # the next submit starts a new one
                        return
                if self._stopping:
                    continue
                plan = self._plan()
                if not plan:
                    # Nothing can run this step (e.g. every request waits on a block another
                    # computes, or all were just preempted): look again shortly.
                    self._cond.wait(timeout=0.001)
                    continue
                self._executing = True
                keeps = [seq.logit_positions(a, b) for seq, a, b in plan]
            t0 = time.perf_counter()
            try:
                outputs = self._execute(plan, keeps)
            except BaseException as exc:  # handed to every request of the step
                log.exception("engine.step_failed", seqs=len(plan))
                with self._cond:
                    self._executing = False
                    for seq, _, _ in plan:
                        self._end(seq)
                        seq.on_failed(exc)
                    self._cond.notify_all()
                continue
            elapsed = time.perf_counter() - t0
            with self._cond:
                self._executing = False
                self._complete(plan, keeps, outputs)
                self._steps += 1
                self._last_tokens = sum(b - a for _, a, b in plan)
                self._last_seqs = len(plan)
                self._step_tokens += self._last_tokens
                self._step_time.observe(elapsed)
                self._cond.notify_all()

    def _fail_all(self, exc: BaseException) -> None:
        for seq in list(self._running):
            self._end(seq)
            seq.on_failed(exc)
        while self._waiting:
            self._waiting.popleft().on_failed(exc)

    def _execute(self, plan: list[tuple[Seq, int, int]],
                 keeps: list[list[int]]) -> list[torch.Tensor]:
        """Run the step: one packed forward per model (one, except while a rollout's old and new
        weights both have requests in flight). Returns each plan entry's logits rows."""
        bs = self.block_size
        pool = self.store.pool.tensor
        quant = self.store.pool.quant
        groups: dict[int, list[int]] = {}
        for i, (seq, _, _) in enumerate(plan):
            groups.setdefault(id(seq.model), []).append(i)
        rows: list[torch.Tensor] = [torch.empty(0)] * len(plan)
        for members in groups.values():
            ids: list[int] = []
            positions: list[int] = []
            slots: list[int] = []
            slices: list[SeqSlice] = []
            keep: list[int] = []
            for i in members:
                seq, a, b = plan[i]
                assert seq.lease is not None
                table = seq.lease.table
                q_start = len(ids)
                ids.extend(seq.tokens[a:b])
                positions.extend(range(a, b))
                slots.extend(table[p // bs] * bs + p % bs for p in range(a, b))
                slices.append(seq_slice(q_start=q_start, q_len=b - a, ctx_len=b, table=table,
                                        block_size=bs,
                                        device=pool.device))
                keep.extend(q_start + p - a for p in keeps[i])
            layout = StepLayout(write_slots=torch.tensor(slots, dtype=torch.long,
                                                         device=pool.device),
                                seqs=tuple(slices))
            with torch.inference_mode():
                logits = packed_forward(plan[members[0]][0].model, pool, ids, positions, layout,
                                        keep, quant)
            at = 0
            for i in members:
                n = len(keeps[i])
                rows[i] = logits[at : at + n]
                at += n
        return rows

    def _complete(self, plan: list[tuple[Seq, int, int]], keeps: list[list[int]],
                  outputs: list[torch.Tensor]) -> None:
        bs = self.block_size
        for (seq, _, b), positions, rows in zip(plan, keeps, outputs, strict=True):
            if seq.lease is None:  # ended meanwhile
                continue
            seq.computed = b
            lease = seq.lease
            if lease.indexing:
                full = b // bs
                chain = self._chain(seq, full)
                while lease.indexing and len(lease.pinned) < full:
                    self.store.adopt(lease, chain[len(lease.pinned)])
            if seq.cancelled or not positions:
                continue
            if seq.first_output_at is None:
                seq.first_output_at = self._clock()
                self._ttft.observe(max(0.0, seq.first_output_at - seq.arrived))
            try:
                finished = seq.on_logits(positions, rows)
            except BaseException as exc:  # noqa: BLE001 - the request's own failure
                self._end(seq)
                seq.on_failed(exc)
                continue
            if finished:
                self._end(seq)
                self._finished += 1
                seq.on_finished()


_LIVE: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    # NOTE: a daemon thread killed mid-forward at interpreter exit aborts the process from
    # inside torch ("terminate called without an active exception"); stop the loops first.
    for scheduler in list(_LIVE):
        scheduler.shutdown(timeout=2.0)
