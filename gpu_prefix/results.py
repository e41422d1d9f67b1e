"""What a generation gives back: a ``TokenEvent`` per token as it streams, then a
``FinalEvent`` holding the whole ``GenerationResult``."""

from __future__ import annotations

from dataclasses import dataclass

FinishReason = str  # "stop" | "length"


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
