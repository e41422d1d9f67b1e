"""Choosing the next token: greedy, or seeded temperature / nucleus sampling.

Reported log-probabilities are those of the model's raw distribution (before temperature and
top-p), the quantity ``Engine.score`` computes teacher-forced, so an auditor can compare them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True, slots=True)
class Choice:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def choose(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    top_logprobs: int,
    generator: torch.Generator | None,
) -> Choice:
    """Pick a token from one position's ``logits`` (shape ``[vocab]``)."""
    logits = logits.detach().to(device="cpu", dtype=torch.float32)
    logprobs = torch.log_softmax(logits, dim=-1)
    if temperature <= 0.0:
        token = int(torch.argmax(logits))
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # Keep the smallest set whose mass reaches top_p (always at least the top token).
            keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < top_p
            keep[0] = True
            filtered = torch.zeros_like(probs)
            filtered[order[keep]] = sorted_p[keep]
            probs = filtered / filtered.sum()
        token = int(torch.multinomial(probs, 1, generator=generator))
    top: tuple[tuple[int, float], ...] = ()
    if top_logprobs > 0:
        values, indices = torch.topk(logprobs, k=min(top_logprobs, logprobs.shape[-1]))
        top = tuple((int(i), float(v)) for i, v in zip(indices, values, strict=True))
    return Choice(token_id=token, logprob=float(logprobs[token]), top=top)
