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
from gpu_prefix.kv_switch import disable_int8
from gpu_prefix.models import LoadedModel, load_model
from gpu_prefix.params import GenerationParams, check_messages, check_params, check_prompt
from gpu_prefix.pool import KVPool, KVShape
from gpu_prefix.results import FinalEvent, FinishReason, GenerationResult, TokenEvent
from gpu_prefix.scheduler import Scheduler, SchedulerConfig, SchedulerStats
from gpu_prefix.sequences import _DONE, _Generation, _Logits
from gpu_prefix.store import PrefixStore, StoreStats

# NOTE: the request and result types live in params and results; importers of this module keep
# finding them here.
__all__ = [
    "Engine",
    "EngineStats",
    "FinalEvent",
    "FinishReason",
    "GenerationParams",
    "GenerationResult",
    "TokenEvent",
]

log = structlog.get_logger()


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
        clean = check_messages(messages)
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
        check_params(params, max_tokens_limit=self.max_tokens_limit)
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
        return check_prompt(ids, vocab_size=self.vocab_size, max_context=self.max_context,
                            extra=extra, field_name=field_name, allow_empty=allow_empty)

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
            return disable_int8(self, reason, layers)

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
