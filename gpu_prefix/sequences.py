"""The engine's two kinds of scheduler sequence: a generation (samples, detokenizes, stops,
streams events) and a prefill-only logits request (scoring and the drift audit). Each hands its
events from the scheduler's thread to the caller's through an outbox.
"""

from __future__ import annotations

import queue
from typing import TYPE_CHECKING, Any

import torch

from gpu_prefix.hashing import BlockKeys
from gpu_prefix.params import GenerationParams
from gpu_prefix.results import FinalEvent, FinishReason, GenerationResult, TokenEvent
from gpu_prefix.sampling import choose
from gpu_prefix.scheduler import Seq
from gpu_prefix.text import Detokenizer, find_stop, safe_len

if TYPE_CHECKING:
    from gpu_prefix.engine import Engine

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
