"""The reference engine: generation and teacher-forced scoring, continuously batched over the
paged KV pool with prefix reuse.

Every request becomes a sequence of ``gpu_prefix.scheduler``: admitted at the pool's watermark
(or queued, or refused with a retryable error), it matches its longest cached prefix (pinning
it), then runs in the scheduler's steps beside the other requests: one packed forward per step,
attention reading each request's K/V from the pool by its block table (``gpu_prefix.attention``).
Its blocks enter the index as they fill, prompt and completion alike, so a follow-up turn reuses
both. Callers' threads only submit and wait for events; one thread runs the model.
"""

from __future__ import annotations

import os
import queue
import random
import threading
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from gpu_prefix.attention import install
from gpu_prefix.capacity import pool_plan
from gpu_prefix.drift import DriftThresholds
from gpu_prefix.drift_sampler import DriftSampler, DriftSamplerConfig
from gpu_prefix.errors import InvalidParamsError
from gpu_prefix.hashing import PUBLIC_SALT, BlockKeys, scope_salt
from gpu_prefix.models import LoadedModel, load_model
from gpu_prefix.pool import KVPool, KVShape
from gpu_prefix.sampling import choose
from gpu_prefix.scheduler import Scheduler, SchedulerConfig, SchedulerStats, Seq
from gpu_prefix.store import PrefixStore, StoreStats
from gpu_prefix.text import Detokenizer, find_stop, safe_len

log = structlog.get_logger()

FinishReason = str  # "stop" | "length"


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationParams:
    """What to generate. ``scope_salt`` comes from ``Engine.scope_salt_for(tenant)``, computed
    server-side from the authenticated tenant; ``None`` keeps the request out of the prefix
    cache altogether (it shares nothing, and stores no blocks nobody could match), so
    forgetting to pass one fails closed."""

    max_tokens: int = 16
    min_tokens: int = 0  # end-of-sequence is not sampled before this many tokens (benchmarks)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    scope_salt: bytes | None = None
    adapter: str = ""
    use_prefix_cache: bool = True
    queue_timeout_s: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationResult:
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenEvent:
    """One generated token, with the text it makes safe to show (stop sequences held back)."""

    token_id: int
    text: str
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class FinalEvent:
    result: GenerationResult
    text: str = ""  # text released only at the end (a held-back tail)


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineStats:
    """The store's and the scheduler's figures together (the engine's Prometheus metrics); a
    field of either reads as an attribute of this (``stats.running``, ``stats.pinned_blocks``)."""

    store: StoreStats
    scheduler: SchedulerStats

    def __getattr__(self, name: str) -> Any:
        for part in (self.store, self.scheduler):
            if name in part.__dataclass_fields__:
                return getattr(part, name)
        raise AttributeError(f"EngineStats has no field {name!r}")


_DONE = object()


class _Outbox:
    """Events from the scheduler's thread to the caller's."""

    def __init__(self) -> None:
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def failed(self, exc: BaseException) -> None:
        self.events.put(exc)


class _Generation(Seq):
    """A generation request: samples a token from each step's last logits, detokenizes, stops."""

    def __init__(self, engine: Engine, prompt: list[int], params: GenerationParams,
                 keys: BlockKeys | None, model: Any, generator: torch.Generator | None) -> None:
        super().__init__(prompt, keys=keys, model=model, max_total=len(prompt) + params.max_tokens)
        self.params = params
        self.prompt_tokens = len(prompt)
        self.generator = generator
        self.eos_ids = engine.eos_ids
        self.sampler = engine.drift_sampler
        self.detok = Detokenizer(engine.tokenizer)
        self.out = _Outbox()
        self.generated: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[tuple[tuple[int, float], ...]] = []
        self.emitted = 0
        self.text = ""
        self.finish: FinishReason = "length"
        self.cut = False  # ended by a stop sequence: the text is final

    def on_logits(self, positions: list[int], rows: torch.Tensor) -> bool:
        p = self.params
        logits = rows[-1]
        if len(self.generated) < p.min_tokens and self.eos_ids:
            logits = logits.clone()
            logits[list(self.eos_ids)] = float("-inf")
        c = choose(logits, temperature=p.temperature, top_p=p.top_p,
                   top_logprobs=p.top_logprobs if p.logprobs else 0, generator=self.generator)
        if c.token_id in self.eos_ids:
            self.finish = "stop"
            return True
        self.generated.append(c.token_id)
        self.tokens.append(c.token_id)
        self.logprobs.append(c.logprob)
        self.tops.append(c.top)
        before = len(self.text)
        self.text += self.detok.add(c.token_id)
        longest = max((len(s) for s in p.stop), default=0)
        cut = find_stop(self.text, p.stop, max(0, before - longest + 1)) if p.stop else None
        if cut is not None:
            self.text = self.text[:cut]
            self.finish = "stop"
            self.cut = True
            self.out.events.put(TokenEvent(token_id=c.token_id, text=self.text[self.emitted :],
                                           logprob=c.logprob, top_logprobs=c.top))
            self.emitted = len(self.text)
            return True
        safe = safe_len(self.text, p.stop)
        self.out.events.put(TokenEvent(token_id=c.token_id, text=self.text[self.emitted : safe],
                                       logprob=c.logprob, top_logprobs=c.top))
        self.emitted = max(self.emitted, safe)
        return len(self.generated) >= p.max_tokens

    def on_finished(self) -> None:
        if not self.cut:
            tail = self.detok.flush()
            if tail:
                self.text += tail
                cut = find_stop(self.text, self.params.stop)
                if cut is not None:
                    self.text = self.text[:cut]
        result = GenerationResult(
            token_ids=tuple(self.generated), text=self.text, logprobs=tuple(self.logprobs),
            top_logprobs=tuple(self.tops), finish_reason=self.finish,
            prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens or 0,
        )
        self.out.events.put(FinalEvent(result=result, text=self.text[self.emitted :]))
        self.out.events.put(_DONE)
        if self.sampler is not None and self.generated:
            # NOTE: after the caller has its answer; offering is a coin toss and a queue append.
            self.sampler.offer(self.tokens[: self.prompt_tokens], self.generated, model=self.model)

    def on_failed(self, exc: BaseException) -> None:
        self.out.failed(exc)


class _Logits(Seq):
    """A prefill-only request: the logits of positions ``from_pos..`` of its tokens."""

    def __init__(self, tokens: list[int], from_pos: int, keys: BlockKeys | None,
                 model: Any) -> None:
        super().__init__(tokens, keys=keys, model=model, max_total=len(tokens))
        self.next_pos = from_pos  # the first position whose logits it has not received yet
        self.rows: list[torch.Tensor] = []
        self.out = _Outbox()

    def first_logit_pos(self) -> int:
        return self.next_pos

    def logit_positions(self, a: int, b: int) -> list[int]:
        # NOTE: from next_pos, not from the first position asked for: a preempted request
        # recomputes positions whose logits it already holds, and must not take them twice.
        return list(range(max(a, self.next_pos), b))

    def on_logits(self, positions: list[int], rows: torch.Tensor) -> bool:
        self.rows.append(rows.float().clone())
        self.next_pos = positions[-1] + 1
        return self.next_pos == len(self.tokens)

    def on_finished(self) -> None:
        self.out.events.put(torch.cat(self.rows, dim=0))

    def on_failed(self, exc: BaseException) -> None:
        self.out.failed(exc)


class Engine:
    """A thread-safe single-model engine: a continuous-batching scheduler over a ``PrefixStore``."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        pool_bytes: int = 256 * 2**20,
        block_size: int = 16,
        high_watermark: float = 0.8,
        max_queue: int = 64,
        max_running: int = 8,
        max_batch_tokens: int = 512,
        max_tokens_limit: int = 4096,
        queue_timeout_s: float = 30.0,
        model_epoch: int = 1,
        isolate_tenants: bool = True,
        public_prefixes: Sequence[Sequence[int]] = (),
        salt_secret: bytes | None = None,
        rng: random.Random | None = None,
        model_id: str | None = None,
        kv_dtype: str = "full",
        drift_sampling: DriftSamplerConfig | None = None,
        drift_thresholds: Mapping[str, DriftThresholds] | None = None,
    ) -> None:
        self.model = loaded.model
        install(self.model)
        self.tokenizer = loaded.tokenizer
        self.model_id = model_id or loaded.name
        self.model_epoch = model_epoch
        self.isolate_tenants = isolate_tenants
        self.public_prefixes = tuple(tuple(int(t) for t in p) for p in public_prefixes)
        self._salt_secret = salt_secret or os.urandom(32)
        self._rng = rng or random.Random()
        self._model_lock = threading.Lock()
        self._int8_lock = threading.Lock()
        self.shape = KVShape.from_config(self.model.config, loaded.dtype)
        self.device = loaded.device
        if max_tokens_limit < 1:
            raise InvalidParamsError("max_tokens_limit",
                                     f"must be at least 1, got {max_tokens_limit}", "use 4096")
        self.max_tokens_limit = max_tokens_limit
        self.pool_bytes = pool_bytes
        self.pool = KVPool(self.shape, budget_bytes=pool_bytes, block_size=block_size,
                           device=self.device, kv_dtype=kv_dtype)
        self.kv_dtype = kv_dtype
        self.int8_disabled_reason: str | None = None  # set by the drift guard (whole model)
        self.int8_layers_disabled_reason: str | None = None  # ... and for some layers
        # the last ``gpu_prefix.drift.DriftReport`` measured on this engine
        self.last_drift: Any = None
        #: Drift thresholds per model id (over ``drift.DEFAULT_THRESHOLDS``).
        self.drift_thresholds = dict(drift_thresholds or {})
        self.store = PrefixStore(self.pool)
        self.scheduler = Scheduler(self.store, SchedulerConfig(
            max_running=max_running, max_batch_tokens=max_batch_tokens, max_queue=max_queue,
            queue_timeout_s=queue_timeout_s, high_watermark=high_watermark))
        config = self.model.config.get_text_config(decoder=True)
        self.max_context = int(getattr(config, "max_position_embeddings", 2048))
        self.vocab_size = int(config.vocab_size)
        eos = self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        #: Re-runs a sample of finished INT8 generations in full precision, in the background.
        self.drift_sampler: DriftSampler | None = None
        if drift_sampling is not None:
            drift_sampling.check(block_size)
        if kv_dtype == "int8" and drift_sampling is not None and drift_sampling.rate > 0:
            self.drift_sampler = DriftSampler(self, drift_sampling)
        plan = pool_plan(block_bytes=self.pool.block_bytes, pool_bytes=pool_bytes,
                         block_size=block_size, high_watermark=high_watermark)
        log.info("engine.pool", model=self.model_id, device=str(self.device), kv_dtype=kv_dtype,
                 **plan.as_log())

    @classmethod
    def from_name(cls, name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  **kwargs: Any) -> Engine:
        return cls(load_model(name, device=device, dtype=dtype), **kwargs)

    # -- tenants and prompts -------------------------------------------------------------------

    def scope_salt_for(self, tenant: str) -> bytes:
        """The block-hash salt for ``tenant``: per tenant when isolating, shared otherwise."""
        if not self.isolate_tenants:
            return PUBLIC_SALT
        return scope_salt(tenant, secret=self._salt_secret)

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Prompt token ids for chat ``messages`` through the tokenizer's chat template."""
        clean: list[dict[str, str]] = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise InvalidParamsError(f"messages[{i}]", "must be an object",
                                         "send {role, content}")
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant", "developer"):
                raise InvalidParamsError(
                    f"messages[{i}].role", f"unsupported role {role!r}",
                    "use system, user or assistant"
                )
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    if not (isinstance(part, Mapping) and part.get("type") == "text"
                            and isinstance(part.get("text"), str)):
                        raise InvalidParamsError(
                            f"messages[{i}].content[{j}]", "only text parts are supported",
                            "send {type: text, text}"
                        )
                    parts.append(part["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise InvalidParamsError(f"messages[{i}].content", "must be a string",
                                         "send the message text")
            clean.append({"role": "system" if role == "developer" else role, "content": content})
        if not clean:
            raise InvalidParamsError("messages", "must not be empty", "send at least one message")
        ids = self.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return [int(t) for t in ids]

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        return text

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[int],
                 params: GenerationParams | None = None) -> GenerationResult:
        """Generate a completion for ``prompt_ids``."""
        for event in self.generate_stream(prompt_ids, params):
            if isinstance(event, FinalEvent):
                return event.result
        raise RuntimeError("generation ended without a result")

    def generate_stream(
        self, prompt_ids: Sequence[int], params: GenerationParams | None = None
    ) -> Generator[TokenEvent | FinalEvent, None, None]:
        """Yield a ``TokenEvent`` per generated token, then one ``FinalEvent``. Closing the
        iterator early stops the request and releases its blocks."""
        params = params or GenerationParams()
        self._check_params(params)
        prompt = self._check_prompt(prompt_ids, extra=params.max_tokens)
        generator = None
        if params.temperature > 0.0:
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            generator = torch.Generator(device="cpu").manual_seed(seed)
        model, keys = self._model_and_keys(prompt, params)
        seq = _Generation(self, prompt, params, keys, model, generator)
        self.scheduler.submit(seq, queue_timeout_s=params.queue_timeout_s)
        done = False
        try:
            while True:
                item = seq.out.events.get()
                if item is _DONE:
                    done = True
                    return
                if isinstance(item, BaseException):
                    done = True
                    raise item
                yield item
        finally:
            if not done:
                self.scheduler.cancel(seq)

    def score(
        self,
        prompt_ids: Sequence[int],
        completion_ids: Sequence[int],
        *,
        scope_salt: bytes | None = None,
        use_prefix_cache: bool = True,
    ) -> list[float]:
        """Teacher-forced log-probabilities of ``completion_ids`` after ``prompt_ids``."""
        completion = list(completion_ids)
        rows = self.teacher_forced_logits(prompt_ids, completion, scope_salt=scope_salt,
                                          use_prefix_cache=use_prefix_cache)
        if not len(rows):
            return []
        lp = torch.log_softmax(rows, dim=-1)
        idx = torch.tensor(completion, device=lp.device)[:, None]
        return [float(v) for v in lp.gather(1, idx)[:, 0].cpu()]

    def teacher_forced_logits(
        self,
        prompt_ids: Sequence[int],
        completion_ids: Sequence[int],
        *,
        scope_salt: bytes | None = None,
        use_prefix_cache: bool = True,
    ) -> torch.Tensor:
        """The next-token logits before each of ``completion_ids`` (``[len(completion), vocab]``,
        float32), the completion fed in as if generated: what ``score`` and the drift audit read."""
        prompt = self._check_prompt(prompt_ids, extra=0)
        completion = self._check_prompt(completion_ids, extra=len(prompt),
                                        field_name="completion_ids", allow_empty=True)
        if not completion:
            return torch.empty((0, self.vocab_size))
        # The last completion token never runs: its log-probability comes from the one before.
        return self._logits(prompt + completion[:-1], len(prompt) - 1, scope_salt, use_prefix_cache)

    def next_token_logits(
        self, prompt_ids: Sequence[int], *, scope_salt: bytes | None = None,
        use_prefix_cache: bool = True
    ) -> tuple[torch.Tensor, int]:
        """The last prompt position's logits, through the same reuse path as ``generate``, and
        how many prompt tokens came from cached blocks (for benches and exactness checks)."""
        prompt = self._check_prompt(prompt_ids, extra=0)
        seq = self._logits_seq(prompt, len(prompt) - 1, scope_salt, use_prefix_cache)
        return self._wait(seq)[-1], seq.cached_tokens or 0

    def _logits(self, tokens: list[int], from_pos: int, salt: bytes | None,
                use_cache: bool) -> torch.Tensor:
        return self._wait(self._logits_seq(tokens, from_pos, salt, use_cache))

    def _logits_seq(self, tokens: list[int], from_pos: int, salt: bytes | None,
                    use_cache: bool) -> _Logits:
        params = GenerationParams(max_tokens=1, scope_salt=salt, use_prefix_cache=use_cache)
        model, keys = self._model_and_keys(tokens, params)
        seq = _Logits(tokens, from_pos, keys, model)
        self.scheduler.submit(seq)
        return seq

    def _wait(self, seq: _Logits) -> torch.Tensor:
        try:
            item = seq.out.events.get()
        except BaseException:
            self.scheduler.cancel(seq)
            raise
        if isinstance(item, BaseException):
            raise item
        logits: torch.Tensor = item
        return logits

    # -- internals -----------------------------------------------------------------------------

    def _model_and_keys(self, prompt: Sequence[int],
                        params: GenerationParams) -> tuple[Any, BlockKeys | None]:
        # NOTE: weights and epoch are read together under the lock on_rollout swaps them under:
        # old weights' KV hashed under a new epoch would be served as the new model's.
        with self._model_lock:
            model, epoch, kv_dtype = self.model, self.model_epoch, self.pool.kv_key
        # NOTE: no salt, no cache: a salt of its own would only fill the pool with blocks that
        # no request can ever match, evicting other tenants' (the auditor's scoring did this).
        if not params.use_prefix_cache or params.scope_salt is None:
            return model, None
        return model, self._block_keys(prompt, params, epoch, kv_dtype)

    def _block_keys(self, prompt: Sequence[int], params: GenerationParams, epoch: int | None = None,
                    kv_dtype: str | None = None) -> BlockKeys:
        salt = params.scope_salt
        assert salt is not None, "unsalted requests do not use the prefix cache"
        public = 0
        for p in self.public_prefixes:
            if len(p) > public and len(prompt) >= len(p) and tuple(prompt[: len(p)]) == p:
                public = len(p)
        epoch = self.model_epoch if epoch is None else epoch
        return BlockKeys(model_epoch=epoch, adapter=params.adapter, salt=salt, public_tokens=public,
                         kv_dtype=self.pool.kv_key if kv_dtype is None else kv_dtype)

    def _check_prompt(
        self, ids: Sequence[int], *, extra: int, field_name: str = "prompt_ids",
        allow_empty: bool = False
    ) -> list[int]:
        try:
            out = list(map(int, ids))
        except (TypeError, ValueError):
            raise InvalidParamsError(field_name, "must be a list of integer token ids",
                                     "send token ids") from None
        if not out and not allow_empty:
            raise InvalidParamsError(field_name, "must not be empty", "send at least one token")
        if out and (min(out) < 0 or max(out) >= self.vocab_size):
            bad = [t for t in out if not 0 <= t < self.vocab_size]
            raise InvalidParamsError(field_name,
                                     f"token id {bad[0]} outside the vocabulary [0, "
                                     f"{self.vocab_size})", "send valid ids")
        if len(out) + extra > self.max_context:
            raise InvalidParamsError(
                field_name,
                f"{len(out)} tokens + {extra} more exceed the model's context of "
                f"{self.max_context}",
                "shorten the prompt or lower max_tokens",
            )
        return out

    def _check_params(self, p: GenerationParams) -> None:
        if not isinstance(p.max_tokens, int) or p.max_tokens < 1:
            raise InvalidParamsError("max_tokens",
                                     f"must be a positive integer, got {p.max_tokens!r}",
                                     "use e.g. 16")
        if not 0 <= p.min_tokens <= p.max_tokens:
            raise InvalidParamsError("min_tokens",
                                     f"must be in [0, max_tokens], got {p.min_tokens}", "use 0")
        if p.max_tokens > self.max_tokens_limit:
            raise InvalidParamsError("max_tokens",
                                     f"{p.max_tokens} is over this engine's per-request budget of "
                                     f"{self.max_tokens_limit} tokens",
                                     f"ask for at most {self.max_tokens_limit}")
        if not 0.0 <= p.temperature <= 2.0:
            raise InvalidParamsError("temperature", f"must be in [0, 2], got {p.temperature}",
                                     "use 0 for greedy")
        if not 0.0 < p.top_p <= 1.0:
            raise InvalidParamsError("top_p", f"must be in (0, 1], got {p.top_p}", "use 1.0")
        if not 0 <= p.top_logprobs <= 20:
            raise InvalidParamsError("top_logprobs", f"must be in [0, 20], got {p.top_logprobs}",
                                     "use at most 20")
        if any(not isinstance(s, str) or not s for s in p.stop) or len(p.stop) > 4:
            raise InvalidParamsError("stop", "must be up to 4 non-empty strings",
                                     "send e.g. ['\\n\\n']")

    # -- operations ----------------------------------------------------------------------------

    def on_rollout(self, model: Any, new_epoch: int) -> int:
        """Switch to ``model`` (new weights) at ``new_epoch``; drop older epochs' blocks. Requests
        in flight finish on the weights they started with; their pinned blocks go when they end.
        Returns the blocks freed now."""
        if new_epoch == self.model_epoch:
            raise InvalidParamsError("new_epoch", f"epoch {new_epoch} is current",
                                     "give every rollout a fresh epoch")
        if model is not None:
            shape = KVShape.from_config(model.config, next(model.parameters()).dtype)
            if shape != self.shape:
                raise InvalidParamsError(
                    "model", f"KV geometry {shape} differs from the pool's {self.shape}",
                    "start a new engine",
                )
            model.eval()
        with self._model_lock:
            if model is not None:
                self.model = model
            self.model_epoch = new_epoch
        freed = self.store.drop_epochs_except(new_epoch)
        log.info("engine.rollout", epoch=new_epoch, blocks_freed=freed)
        return freed

    def disable_int8(self, reason: str, *, layers: Iterable[int] | None = None) -> int:
        """Turn INT8 KV off (the drift guard), for the whole model, or with ``layers`` for just
        those layers (kept in full precision from now on; the others stay INT8; once every layer
        is, it is the whole model). New requests use the new storage at once; running ones are
        preempted and recomputed in it; every INT8 block goes (the KV dtype, with the set of
        full-precision layers, is in their hashes, so none could match a request of the new
        storage anyway). The pool keeps its byte budget, so it holds fewer blocks. Returns the
        blocks dropped."""
        # NOTE: the audit's thread and the sampler's may both trip; one switch at a time, each
        # from the storage the other left.
        with self._int8_lock:
            return self._disable_int8(reason, layers)

    def _disable_int8(self, reason: str, layers: Iterable[int] | None) -> int:
        old = self.store
        quant = old.pool.quant
        if self.kv_dtype != "int8" or quant is None:
            return 0
        full = quant.full_layers | frozenset(int(x) for x in (layers or ()))
        whole = layers is None or full >= frozenset(range(self.shape.num_layers))
        if not whole and full == quant.full_layers:
            return 0
        dropped = old.pool.num_used
        rules = (quant.k_scale_for, quant.v_scale_for)

        def new_store() -> PrefixStore:
            # let the INT8 storage go before allocating (the old pool is never used again)
            old.pool.tensor = old.pool.quant = None  # type: ignore[assignment]
            if whole:
                self.pool = KVPool(self.shape, budget_bytes=self.pool_bytes,
                                   block_size=old.block_size, device=self.device)
            else:
                self.pool = KVPool(self.shape, budget_bytes=self.pool_bytes,
                                   block_size=old.block_size,
                                   device=self.device, kv_dtype="int8", full_layers=full)
                assert self.pool.quant is not None
                # NOTE: the layers left INT8 keep being quantized as before (the same scale rules).
                self.pool.quant.k_scale_for, self.pool.quant.v_scale_for = rules  # type: ignore[method-assign]
            self.store = PrefixStore(self.pool)
            return self.store

        with self._model_lock:
            if whole:
                self.kv_dtype = "full"
            self.scheduler.replace_store(new_store)
        if whole:
            self.int8_disabled_reason = reason
            if self.drift_sampler is not None:
                self.drift_sampler.drop_queued()
        else:
            self.int8_layers_disabled_reason = reason
        log.warning("engine.int8_disabled", model=self.model_id, reason=reason,
                    blocks_dropped=dropped, pool_blocks=self.pool.num_blocks,
                    layers="all" if whole else sorted(full))
        return dropped

    @property
    def int8_full_layers(self) -> frozenset[int]:
        """Layers of an INT8 engine kept in full precision by the drift guard."""
        quant = self.pool.quant
        return quant.full_layers if quant is not None else frozenset()

    def close(self) -> None:
        """Stop the scheduler's thread (requests in flight fail) and the drift sampler's. (The
        scheduler also stops by itself when idle, and at interpreter exit.)"""
        if self.drift_sampler is not None:
            self.drift_sampler.close()
        self.scheduler.shutdown()

    def stats(self) -> EngineStats:
        return EngineStats(store=self.store.stats(), scheduler=self.scheduler.stats())
