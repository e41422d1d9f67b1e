"""Recomputing an answer under the current model, and judging a cached one against it.

An :class:`Oracle` is what the shadow auditor asks: the in-process reference engine or an
OpenAI-compatible upstream (both adapters live in the service). Two judgements:

* **Exact** (deterministic requests: temperature 0, or a seed, on an oracle that reproduces
  them bit for bit, as the reference engine does): the recompute must equal the cached answer,
  choice by choice. Any difference is a ``mismatch``.
* **Scored** (everything else, or an oracle that is not exact): the cached completion is scored
  teacher-forced under the current model, and so is a fresh recompute of the same request. The
  statistic is the mean negative log-likelihood per token (NLL, in nats). The cached answer is
  flagged when ``cached_nll > fresh_nll + max(margin, ratio * fresh_nll)``.

Why that tolerance: a correct hit was produced by this model for this prompt, so its NLL differs
from a fresh recompute's only by numeric noise (float32 reordering: ~1e-4 nats/token; bf16 or
quantised KV: ~0.05) and, for sampled requests, by sampling spread (the per-token NLL of samples
at temperature <= 1 has a standard deviation of a fraction of a nat over tens of tokens). A wrong
answer (another prompt's answer, another model's answer, a forged body) is not conditioned on
this prompt: its tokens are surprising to the model by several nats each. The default margin of
1.5 nats/token (or half the fresh NLL, whichever is larger) sits between the two, and answers
shorter than ``min_tokens`` are left undecided because a handful of tokens cannot separate them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from audit.answer import Answer
from audit.errors import AuditConfigError
from audit.finding import Draft

RequestKind = Literal["chat", "completion"]


class Oracle(Protocol):
    """Recomputes answers under the current model. Called from the auditor's worker thread."""

    #: True when a deterministic request reproduces bit for bit (the reference engine).
    exact: bool

    def complete(self, request: Mapping[str, Any], kind: RequestKind, *, tenant: str) -> Answer:
        """A fresh answer to ``request``. Raises ``OracleError`` when it cannot."""
        ...

    def score(
        self, request: Mapping[str, Any], kind: RequestKind, completion: str, *, tenant: str
    ) -> Sequence[float] | None:
        """Teacher-forced log-probabilities of ``completion``'s tokens after the request's
        prompt, under the current model; None when the oracle cannot score."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Tolerance:
    """How far a cached answer's NLL may sit above a fresh recompute's (see the module doc)."""

    margin_nats: float = 1.5
    ratio: float = 0.5
    min_tokens: int = 4

    def __post_init__(self) -> None:
        if not (self.margin_nats > 0 and math.isfinite(self.margin_nats)):
            raise AuditConfigError("audit.tolerance.margin_nats", f"{self.margin_nats!r} is not > 0",
                                   "use a positive number of nats per token, e.g. 1.5")
        if not (self.ratio >= 0 and math.isfinite(self.ratio)):
            raise AuditConfigError("audit.tolerance.ratio", f"{self.ratio!r} is not >= 0",
                                   "use a non-negative fraction, e.g. 0.5")
        if self.min_tokens < 1:
            raise AuditConfigError("audit.tolerance.min_tokens", f"{self.min_tokens!r} is not >= 1",
                                   "use at least 1 token")

    def allowed(self, fresh_nll: float) -> float:
        return max(self.margin_nats, self.ratio * fresh_nll)


def mean_nll(logprobs: Sequence[float]) -> float:
    return -sum(logprobs) / len(logprobs)


def judge_exact(cached: Answer, fresh: Answer) -> Draft | None:
    """A deterministic request recomputed exactly: any difference is a mismatch."""
    if cached.same_as(fresh):
        return None
    diverge = _first_divergence(cached.first_text, fresh.first_text)
    return Draft(
        kind="mismatch",
        summary="deterministic recompute differs from the cached answer",
        evidence={
            "check": "exact",
            "cached_chars": len(cached.text),
            "fresh_chars": len(fresh.text),
            "first_divergence_char": diverge,
            "cached_finish": [c.finish_reason for c in cached.choices],
            "fresh_finish": [c.finish_reason for c in fresh.choices],
        },
    )


def _first_divergence(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


Verdict = Literal["pass", "finding", "undecided"]


def judge_scored(
    cached_logprobs: Sequence[float] | None,
    fresh_logprobs: Sequence[float] | None,
    tolerance: Tolerance,
) -> tuple[Verdict, Draft | None, dict[str, Any]]:
    """Compare teacher-forced scores of the cached and the fresh answer (see the module doc)."""
    if not cached_logprobs or not fresh_logprobs:
        return "undecided", None, {"reason": "oracle could not score"}
    if len(cached_logprobs) < tolerance.min_tokens:
        return "undecided", None, {"reason": f"fewer than {tolerance.min_tokens} tokens"}
    cached = mean_nll(cached_logprobs)
    fresh = mean_nll(fresh_logprobs)
    allowed = tolerance.allowed(fresh)
    evidence = {
        "check": "scored",
        "cached_nll": round(cached, 6),
        "fresh_nll": round(fresh, 6),
        "allowed_excess": round(allowed, 6),
        "cached_tokens": len(cached_logprobs),
        "fresh_tokens": len(fresh_logprobs),
    }
    if not math.isfinite(cached) or cached - fresh > allowed:
        return "finding", Draft(
            kind="mismatch",
            summary="cached answer is implausible under the current model",
            evidence=evidence,
        ), evidence
    return "pass", None, evidence
