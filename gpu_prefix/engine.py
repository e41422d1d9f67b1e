"""The reference engine: generation and teacher-forced scoring with prefix reuse.

Each request is admitted by the store (or queued, or refused with a retryable error), matches
its longest cached prefix (pinning it), loads those blocks into its ``RequestCache``, runs only
the rest of the prompt, writes its new full prompt blocks back to the pool, and decodes. Model
forwards run under one lock, step by step, so streaming requests interleave and many can be in
flight (up to the store's ``max_running``) while the model itself is used by one at a time.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from gpu_prefix.adapter import BufferArena, RequestCache
from gpu_prefix.errors import InvalidParamsError
from gpu_prefix.hashing import PUBLIC_SALT, BlockKeys, block_hashes, scope_salt
from gpu_prefix.models import LoadedModel, load_model
from gpu_prefix.pool import KVPool, KVShape
from gpu_prefix.sampling import choose
from gpu_prefix.store import Lease, PrefixStore, StoreStats

log = structlog.get_logger()

FinishReason = str  # "stop" | "length"


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerationParams:
    """What to generate. ``scope_salt`` comes from ``Engine.scope_salt_for(tenant)``, computed
    server-side from the authenticated tenant; ``None`` keeps the request out of the prefix
    cache altogether (it shares nothing, and stores no blocks nobody could match), so
    forgetting to pass one fails closed."""

    max_tokens: int = 16
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


@dataclass(kw_only=True)
class _Prefill:
    lease: Lease | None
    cache: RequestCache
    logits: torch.Tensor
    cached_tokens: int
    model: Any = field(repr=False)
    keys: BlockKeys | None = None


class Engine:
    """A thread-safe single-model engine over a ``PrefixStore``."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        pool_bytes: int = 256 * 2**20,
        block_size: int = 16,
        high_watermark: float = 0.8,
        max_queue: int = 64,
        max_running: int = 8,
        queue_timeout_s: float = 30.0,
        model_epoch: int = 1,
        isolate_tenants: bool = True,
        public_prefixes: Sequence[Sequence[int]] = (),
        salt_secret: bytes | None = None,
        rng: random.Random | None = None,
        model_id: str | None = None,
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_id = model_id or loaded.name
        self.model_epoch = model_epoch
        self.isolate_tenants = isolate_tenants
        self.public_prefixes = tuple(tuple(int(t) for t in p) for p in public_prefixes)
        self._salt_secret = salt_secret or os.urandom(32)
        self._rng = rng or random.Random()
        self._model_lock = threading.Lock()
        self.shape = KVShape.from_config(self.model.config, loaded.dtype)
        self.device = loaded.device
        self.pool = KVPool(self.shape, budget_bytes=pool_bytes, block_size=block_size, device=self.device)
        self.store = PrefixStore(
            self.pool,
            high_watermark=high_watermark,
            max_queue=max_queue,
            max_running=max_running,
            queue_timeout_s=queue_timeout_s,
        )
        self._arena = BufferArena(self.shape, device=self.device, max_buffers=max_running)
        config = self.model.config.get_text_config(decoder=True)
        self.max_context = int(getattr(config, "max_position_embeddings", 2048))
        self.vocab_size = int(config.vocab_size)
        eos = self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    @classmethod
    def from_name(cls, name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, **kwargs: Any) -> Engine:
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
                raise InvalidParamsError(f"messages[{i}]", "must be an object", "send {role, content}")
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant", "developer"):
                raise InvalidParamsError(
                    f"messages[{i}].role", f"unsupported role {role!r}", "use system, user or assistant"
                )
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                        raise InvalidParamsError(
                            f"messages[{i}].content[{j}]", "only text parts are supported", "send {type: text, text}"
                        )
                    parts.append(part["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise InvalidParamsError(f"messages[{i}].content", "must be a string", "send the message text")
            clean.append({"role": "system" if role == "developer" else role, "content": content})
        if not clean:
            raise InvalidParamsError("messages", "must not be empty", "send at least one message")
        ids = self.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True, return_dict=False)
        return [int(t) for t in ids]

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- generation ----------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[int], params: GenerationParams | None = None) -> GenerationResult:
        """Generate a completion for ``prompt_ids``."""
        for event in self.generate_stream(prompt_ids, params):
            if isinstance(event, FinalEvent):
                return event.result
        raise RuntimeError("generation ended without a result")

    def generate_stream(
        self, prompt_ids: Sequence[int], params: GenerationParams | None = None
    ) -> Iterator[TokenEvent | FinalEvent]:
        """Yield a ``TokenEvent`` per generated token, then one ``FinalEvent``."""
        params = params or GenerationParams()
        prompt = self._check_prompt(prompt_ids, extra=params.max_tokens)
        self._check_params(params)
        generator = None
        if params.temperature > 0.0:
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            generator = torch.Generator(device="cpu").manual_seed(seed)
        pre = self._prefill(prompt, params, capacity=len(prompt) + params.max_tokens)
        try:
            tokens: list[int] = []
            lps: list[float] = []
            tops: list[tuple[tuple[int, float], ...]] = []
            emitted = 0
            text = ""
            finish: FinishReason = "length"
            logits = pre.logits
            while len(tokens) < params.max_tokens:
                c = choose(
                    logits, temperature=params.temperature, top_p=params.top_p,
                    top_logprobs=params.top_logprobs if params.logprobs else 0, generator=generator,
                )
                if c.token_id in self.eos_ids:
                    finish = "stop"
                    break
                tokens.append(c.token_id)
                lps.append(c.logprob)
                tops.append(c.top)
                text = self.decode(tokens)
                cut = _find_stop(text, params.stop)
                if cut is not None:
                    text = text[:cut]
                    finish = "stop"
                    yield TokenEvent(token_id=c.token_id, text=text[emitted:], logprob=c.logprob, top_logprobs=c.top)
                    emitted = len(text)
                    break
                safe = _safe_len(text, params.stop)
                yield TokenEvent(token_id=c.token_id, text=text[emitted:safe], logprob=c.logprob, top_logprobs=c.top)
                emitted = max(emitted, safe)
                if len(tokens) >= params.max_tokens:
                    break
                logits = self._forward(pre, [c.token_id])
            self._store_completion(pre, prompt, tokens)
            result = GenerationResult(
                token_ids=tuple(tokens),
                text=text,
                logprobs=tuple(lps),
                top_logprobs=tuple(tops),
                finish_reason=finish,
                prompt_tokens=len(prompt),
                cached_tokens=pre.cached_tokens,
            )
            yield FinalEvent(result=result, text=text[emitted:])
        finally:
            self._finish(pre)

    def score(
        self,
        prompt_ids: Sequence[int],
        completion_ids: Sequence[int],
        *,
        scope_salt: bytes | None = None,
        use_prefix_cache: bool = True,
    ) -> list[float]:
        """Teacher-forced log-probabilities of ``completion_ids`` after ``prompt_ids``."""
        prompt = self._check_prompt(prompt_ids, extra=0)
        completion = self._check_prompt(completion_ids, extra=len(prompt), field_name="completion_ids", allow_empty=True)
        if not completion:
            return []
        params = GenerationParams(max_tokens=0, scope_salt=scope_salt, use_prefix_cache=use_prefix_cache)
        pre = self._prefill(prompt, params, capacity=len(prompt) + len(completion), all_logits=True)
        try:
            first = pre.logits  # logits at the last prompt position
            rest = self._forward(pre, completion[:-1], all_logits=True) if len(completion) > 1 else None
            rows = first[None, :] if rest is None else torch.cat([first[None, :], rest], dim=0)
            lp = torch.log_softmax(rows.float(), dim=-1)
            idx = torch.tensor(completion, device=lp.device)[:, None]
            return [float(v) for v in lp.gather(1, idx)[:, 0].cpu()]
        finally:
            self._finish(pre)

    def next_token_logits(
        self, prompt_ids: Sequence[int], *, scope_salt: bytes | None = None, use_prefix_cache: bool = True
    ) -> tuple[torch.Tensor, int]:
        """The last prompt position's logits, through the same reuse path as ``generate``, and
        how many prompt tokens came from cached blocks (for benches and exactness checks)."""
        prompt = self._check_prompt(prompt_ids, extra=0)
        params = GenerationParams(max_tokens=1, scope_salt=scope_salt, use_prefix_cache=use_prefix_cache)
        pre = self._prefill(prompt, params, capacity=len(prompt))
        try:
            return pre.logits, pre.cached_tokens
        finally:
            self._finish(pre)

    # -- internals -----------------------------------------------------------------------------

    def _block_keys(self, prompt: Sequence[int], params: GenerationParams, epoch: int | None = None) -> BlockKeys:
        salt = params.scope_salt
        assert salt is not None, "unsalted requests do not use the prefix cache"
        public = 0
        for p in self.public_prefixes:
            if len(p) > public and len(prompt) >= len(p) and tuple(prompt[: len(p)]) == p:
                public = len(p)
        epoch = self.model_epoch if epoch is None else epoch
        return BlockKeys(model_epoch=epoch, adapter=params.adapter, salt=salt, public_tokens=public)

    def _prefill(
        self, prompt: list[int], params: GenerationParams, *, capacity: int, all_logits: bool = False
    ) -> _Prefill:
        # NOTE: weights and epoch are read together under the lock on_rollout swaps them under:
        # old weights' KV hashed under a new epoch would be served as the new model's.
        with self._model_lock:
            model, epoch = self.model, self.model_epoch
        cached = 0
        bs = self.pool.block_size
        # NOTE: no salt, no cache: a salt of its own would only fill the pool with blocks that
        # no request can ever match, evicting other tenants' (the auditor's scoring did this).
        use_cache = params.use_prefix_cache and params.scope_salt is not None
        keys = self._block_keys(prompt, params, epoch) if use_cache else None
        if keys is not None:
            chain = block_hashes(prompt, keys, block_size=bs)
        # NOTE: requests that skip the cache are still admitted (reserving no blocks), so
        # max_running bounds every request's working KV, not only the caching ones.
        # The reservation covers every token whose KV this request may store: the prompt and,
        # for generation, the completion (cached too, so a follow-up turn reuses it).
        lease = self.store.acquire(capacity if use_cache else 0, timeout=params.queue_timeout_s)
        cache = RequestCache(self.shape, capacity, buffer=self._arena.take(capacity))
        try:
            if use_cache:
                # At least one prompt token must run, to produce the next token's logits.
                usable = (len(prompt) - 1) // bs
                match = self.store.match(lease, chain[:usable])
                cached = cache.load_blocks(self.pool, match.block_ids)
            pre = _Prefill(lease=lease, cache=cache, logits=torch.empty(0), cached_tokens=cached, model=model,
                           keys=keys)
            out = self._forward(pre, prompt[cached:], all_logits=all_logits)
            pre.logits = out[-1] if all_logits else out
            if use_cache:
                start = len(match.block_ids)
                stored = self.store.insert(lease, chain, start)
                cache.store_blocks(self.pool, stored.block_ids, stored.fresh, start)
                self.store.commit(lease)
            return pre
        except BaseException:
            self.store.release(lease)
            self._arena.give(cache.buffer)
            raise

    def _store_completion(self, pre: _Prefill, prompt: list[int], tokens: list[int]) -> None:
        """Cache the full blocks the completion added (their KV is in the request's buffer)."""
        if pre.lease is None or pre.keys is None:
            return
        bs = self.pool.block_size
        start = len(pre.lease.pinned)
        if pre.cache.length // bs <= start:
            return  # the completion filled no new block: nothing to hash or store
        # The last sampled token was never run, so its KV is not in the buffer.
        seq = prompt + tokens[: pre.cache.length - len(prompt)]
        chain = block_hashes(seq, pre.keys, block_size=bs)
        stored = self.store.insert(pre.lease, chain, start)
        pre.cache.store_blocks(self.pool, stored.block_ids, stored.fresh, start)
        self.store.commit(pre.lease)

    def _forward(self, pre: _Prefill, ids: Sequence[int], *, all_logits: bool = False) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        with self._model_lock, torch.inference_mode():
            out = pre.model(input_ids=x, cache=pre.cache, use_cache=True, logits_to_keep=0 if all_logits else 1)
        logits = out.logits[0]
        return logits if all_logits else logits[-1]

    def _finish(self, pre: _Prefill) -> None:
        if pre.lease is not None and not pre.lease.released:
            self.store.release(pre.lease)
            self._arena.give(pre.cache.buffer)

    def _check_prompt(
        self, ids: Sequence[int], *, extra: int, field_name: str = "prompt_ids", allow_empty: bool = False
    ) -> list[int]:
        try:
            out = list(map(int, ids))
        except (TypeError, ValueError):
            raise InvalidParamsError(field_name, "must be a list of integer token ids", "send token ids") from None
        if not out and not allow_empty:
            raise InvalidParamsError(field_name, "must not be empty", "send at least one token")
        if out and (min(out) < 0 or max(out) >= self.vocab_size):
            bad = [t for t in out if not 0 <= t < self.vocab_size]
            raise InvalidParamsError(field_name, f"token id {bad[0]} outside the vocabulary [0, {self.vocab_size})", "send valid ids")
        if len(out) + extra > self.max_context:
            raise InvalidParamsError(
                field_name,
                f"{len(out)} tokens + {extra} more exceed the model's context of {self.max_context}",
                "shorten the prompt or lower max_tokens",
            )
        return out

    @staticmethod
    def _check_params(p: GenerationParams) -> None:
        if not isinstance(p.max_tokens, int) or p.max_tokens < 1:
            raise InvalidParamsError("max_tokens", f"must be a positive integer, got {p.max_tokens!r}", "use e.g. 16")
        if not 0.0 <= p.temperature <= 2.0:
            raise InvalidParamsError("temperature", f"must be in [0, 2], got {p.temperature}", "use 0 for greedy")
        if not 0.0 < p.top_p <= 1.0:
            raise InvalidParamsError("top_p", f"must be in (0, 1], got {p.top_p}", "use 1.0")
        if not 0 <= p.top_logprobs <= 20:
            raise InvalidParamsError("top_logprobs", f"must be in [0, 20], got {p.top_logprobs}", "use at most 20")
        if any(not isinstance(s, str) or not s for s in p.stop) or len(p.stop) > 4:
            raise InvalidParamsError("stop", "must be up to 4 non-empty strings", "send e.g. ['\\n\\n']")

    # -- operations ----------------------------------------------------------------------------

    def on_rollout(self, model: Any, new_epoch: int) -> int:
        """Switch to ``model`` (new weights) at ``new_epoch``; drop older epochs' blocks. Requests
        in flight finish on the weights they started with; their pinned blocks go when they end.
        Returns the blocks freed now."""
        if new_epoch == self.model_epoch:
            raise InvalidParamsError("new_epoch", f"epoch {new_epoch} is current", "give every rollout a fresh epoch")
        if model is not None:
            shape = KVShape.from_config(model.config, next(model.parameters()).dtype)
            if shape != self.shape:
                raise InvalidParamsError(
                    "model", f"KV geometry {shape} differs from the pool's {self.shape}", "start a new engine"
                )
            model.eval()
        with self._model_lock:
            if model is not None:
                self.model = model
            self.model_epoch = new_epoch
        freed = self.store.drop_epochs_except(new_epoch)
        log.info("engine.rollout", epoch=new_epoch, blocks_freed=freed)
        return freed

    def stats(self) -> StoreStats:
        return self.store.stats()


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def _safe_len(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be shown: hold back a tail that may begin a stop sequence, and
    a trailing replacement character (a multi-byte character split across tokens)."""
    n = len(text)
    while n > 0 and text[n - 1] == "\ufffd":
        n -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[n - k : n] == s[:k]:
                hold = max(hold, k)
                break
    return n - hold
