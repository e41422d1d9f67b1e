"""Recomputing an answer under the current model, and judging a cached one against it.

An :class:`Oracle` is what the shadow auditor asks: the in-process reference engine or an
OpenAI-compatible upstream (both adapters live in the service). Two judgements:

* **Exact** (deterministic requests: temperature 0, or a seed, on an oracle that reproduces
  them bit for bit, as the reference engine does): the recompute must equal the cached answer,
  choice by choice. Any difference is a ``mismatch``.
* **Scored** (everything else, or an oracle that is not exact): the cached completion and a
  fresh recompute are both scored teacher-forced under the current model, each twice: after the
  request's prompt and after a neutral prompt (one empty user message). Two statistics, in
  nats per token:

  - ``nll``: mean negative log-likelihood after the request's prompt;
  - ``gain``: ``nll`` after the neutral prompt minus ``nll`` after the request's prompt, i.e. how
    much the request's prompt explains the answer (a pointwise mutual information).

  The cached answer is flagged when either

  - ``gain < min(min_gain, fresh_gain - gain_margin)``: the prompt explains the cached answer
    no better than a neutral prompt does, while it does explain a fresh answer; or
  - ``nll > fresh_nll + max(nll_margin, nll_ratio * fresh_nll)``: it is far more surprising to
    the model than a fresh answer (gibberish, another model's style, a corrupted body).

Why these tolerances. A correct hit was produced by this model for this prompt, so it differs
from a fresh recompute only by numeric noise (float32 reordering: ~1e-4 nats/token; bf16 or
quantised KV: ~0.05) and, for sampled requests, by sampling spread, which is large: on
SmolLM2-135M at temperature 0.7 two samples of one prompt differ by up to ~1.3 nats/token in
``nll``, so ``nll`` alone cannot separate a fresh sample from a fluent but wrong answer (another
prompt's answer scored 1.3 to 4.9). ``gain`` can: every fresh sample measured scored +0.4 to +2.0,
every other prompt's answer -0.2 to -2.4 (``bench``-style calibration over six prompts, three
samples and five wrong answers each; see the README). ``min_gain`` 0.1 and ``gain_margin`` 0.5
sit in that gap; the ``min(...)`` keeps a model whose answers do not depend on the prompt at all
(random weights: every gain is ~0) from flagging its own answers. ``nll_margin`` 4.0 is above the
sampling spread (a fresh sample once scored 2.2 nats above another, which a margin of 2.0
flagged) and below gibberish (random letters or words: 6.3 to 7.0 nats/token on SmolLM2, whose
near-zero ``gain`` is flagged as well). Answers shorter than ``min_tokens`` are undecided: a
handful of tokens cannot separate the two populations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from audit.answer import Answer
from audit.errors import AuditConfigError, OracleError
from audit.finding import Draft
from audit.protocols import Oracle, RequestKind


@dataclass(frozen=True, kw_only=True, slots=True)
class Tolerance:
    """How far a cached answer may sit from a fresh recompute (see the module doc)."""

    min_gain: float = 0.1
    gain_margin: float = 0.5
    nll_margin: float = 4.0
    nll_ratio: float = 0.5
    min_tokens: int = 4

    def __post_init__(self) -> None:
        for name in ("gain_margin", "nll_margin"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise AuditConfigError(f"audit.tolerance.{name}", f"{value!r} is not > 0",
                                       "use a positive number of nats per token")
        if not (self.nll_ratio >= 0 and math.isfinite(self.nll_ratio)):
            raise AuditConfigError("audit.tolerance.nll_ratio", f"{self.nll_ratio!r} is not >= 0",
                                   "use a non-negative fraction, e.g. 0.5")
        if not math.isfinite(self.min_gain):
            raise AuditConfigError("audit.tolerance.min_gain", f"{self.min_gain!r} is not finite",
                                   "use a number of nats per token, e.g. 0.1")
        if self.min_tokens < 1:
            raise AuditConfigError("audit.tolerance.min_tokens", f"{self.min_tokens!r} is not >= 1",
                                   "use at least 1 token")


def neutral_request(request: Mapping[str, Any], kind: RequestKind) -> dict[str, Any]:
    """The request with its prompt replaced by a neutral one (for the ``gain`` baseline)."""
    out = dict(request)
    if kind == "chat":
        out["messages"] = [{"role": "user", "content": ""}]
    else:
        out["prompt"] = ""
    return out


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


@dataclass(frozen=True, kw_only=True, slots=True)
class Scores:
    """Teacher-forced log-probabilities of one answer after the prompt and after a neutral one."""

    prompted: Sequence[float] | None
    neutral: Sequence[float] | None

    @property
    def usable(self) -> bool:
        return bool(self.prompted) and bool(self.neutral)

    @property
    def nll(self) -> float:
        assert self.prompted
        return mean_nll(self.prompted)

    @property
    def gain(self) -> float:
        assert self.prompted and self.neutral
        return mean_nll(self.neutral) - mean_nll(self.prompted)


def judge_scored(
    cached: Scores, fresh: Scores, tolerance: Tolerance
) -> tuple[Verdict, Draft | None, dict[str, Any]]:
    """Compare teacher-forced scores of the cached and a fresh answer (see the module doc)."""
    if not cached.usable or not fresh.usable:
        return "undecided", None, {"reason": "oracle could not score"}
    assert cached.prompted is not None
    if len(cached.prompted) < tolerance.min_tokens:
        return "undecided", None, {"reason": f"fewer than {tolerance.min_tokens} tokens"}
    gain_floor = min(tolerance.min_gain, fresh.gain - tolerance.gain_margin)
    nll_ceiling = fresh.nll + max(tolerance.nll_margin, tolerance.nll_ratio * fresh.nll)
    evidence: dict[str, Any] = {
        "check": "scored",
        "cached_nll": round(cached.nll, 6),
        "fresh_nll": round(fresh.nll, 6),
        "nll_ceiling": round(nll_ceiling, 6),
        "cached_gain": round(cached.gain, 6),
        "fresh_gain": round(fresh.gain, 6),
        "gain_floor": round(gain_floor, 6),
        "cached_tokens": len(cached.prompted),
    }
    reasons = []
    if not math.isfinite(cached.nll) or cached.nll > nll_ceiling:
        reasons.append("far more surprising than a fresh answer")
    if not math.isfinite(cached.gain) or cached.gain < gain_floor:
        reasons.append("the prompt does not explain it")
    if reasons:
        evidence["reasons"] = reasons
        return "finding", Draft(
            kind="mismatch",
            summary="cached answer is implausible under the current model: " + "; ".join(reasons),
            evidence=evidence,
        ), evidence
    return "pass", None, evidence


@dataclass(frozen=True, kw_only=True, slots=True)
class Recomputed:
    """What one recompute decided: ``check`` is ``exact`` or ``scored``; ``verdict`` adds
    ``error`` (the oracle failed; logged, never a finding) to :data:`Verdict`."""

    check: Literal["exact", "scored"]
    verdict: Literal["pass", "finding", "undecided", "error"]
    draft: Draft | None = None
    error: str | None = None


def recompute(
    oracle: Oracle,
    request: Mapping[str, Any],
    kind: RequestKind,
    cached: Answer,
    *,
    deterministic: bool,
    tenant: str,
    tolerance: Tolerance,
) -> Recomputed:
    """Recompute ``request`` and judge ``cached`` against it: exactly for a deterministic
    request on an exact oracle, teacher-forced scores otherwise. Shared by the shadow auditor
    (a sampled hit, with the live request) and the offline scan (the request read back from the
    entry's key material)."""
    check: Literal["exact", "scored"] = "exact" if deterministic and oracle.exact else "scored"
    try:
        fresh = oracle.complete(request, kind, tenant=tenant)
        if check == "exact":
            draft = judge_exact(cached, fresh)
            return Recomputed(check=check, verdict="finding" if draft else "pass", draft=draft)
        if cached.same_as(fresh):
            return Recomputed(check=check, verdict="pass")
        neutral = neutral_request(request, kind)

        def scores(text: str) -> Scores:
            return Scores(prompted=oracle.score(request, kind, text, tenant=tenant),
                          neutral=oracle.score(neutral, kind, text, tenant=tenant))

        cached_scores = scores(cached.first_text)
        fresh_scores = scores(fresh.first_text)
    except OracleError as exc:
        return Recomputed(check=check, verdict="error", error=str(exc))
    verdict, draft, _ = judge_scored(cached_scores, fresh_scores, tolerance)
    return Recomputed(check=check, verdict=verdict, draft=draft)
