"""How far INT8 KV drifts from full precision, measured on the engine's own model, and the guard
that turns INT8 off when it drifts too far.

The measure (:func:`measure`): for each prompt of a fixed, seeded corpus, a long greedy
generation with full-precision KV (the reference) and one with INT8 KV, from the same prompt.
Then both engines are teacher-forced on the reference's continuation, and at every position the
next-token distributions are compared: KL divergence ``KL(P_full || P_int8)`` and whether the top
token is the same (as llama.cpp's ``--kl-divergence`` does). Greedy outputs give the first
position where they part. Every figure is also given by position bucket (completion tokens
0-128, 128-512, 512+), because drift that grows with length is the failure to catch: answers go
wrong after hundreds of tokens while the first ones (and perplexity) look fine. Per layer, the
relative error of the dequantized K and V against the full-precision K/V of the same tokens says
which layers the drift comes from.

The guard (:func:`check`, :func:`enforce`, ``Engine.disable_int8``): a report above its
model's thresholds turns INT8 off, for just the layers the per-layer errors single out
(:func:`attribute`) or else for the whole model; see :data:`DEFAULT_THRESHOLDS` for the defaults
and their reasoning. ``gpu_prefix.drift_sampler`` feeds the same guard from finished requests, in
the background.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from gpu_prefix.kvquant import QuantizedKV

if TYPE_CHECKING:
    from gpu_prefix.engine import Engine

#: Position buckets over completion tokens: ``(name, first, end)``.
BUCKETS: tuple[tuple[str, int, int | None], ...] = (("0-128", 0, 128), ("128-512", 128, 512),
                                                    ("512+", 512, None))

#: The fixed corpus: requests that make a chat model write at length. A corpus is a seeded
#: choice of these (``corpus``), so a run can be repeated exactly.
PROMPTS: tuple[str, ...] = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in depth how a compiler turns source code into machine code, step by step.",
    "Describe the history of the printing press and its effects on Europe, in detail.",
    "Write a thorough guide to growing tomatoes at home, from seed to harvest.",
    "Explain how the heart and lungs work together, for a curious teenager, at length.",
    "Write a long letter from a traveller describing a journey across a desert.",
    "Explain the rules and strategy of chess to a beginner, covering every piece.",
    "Describe how a city's water supply works, from the reservoir to the tap, in detail.",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class DriftThresholds:
    """Where INT8 stops being acceptable. Each applies to the whole run AND to every position
    bucket, so drift that only shows late is not averaged away by the early tokens."""

    kld_mean: float
    kld_p99: float
    top1_agreement: float
    #: A bucket with fewer positions is reported, not judged: two close calls in 32 tokens
    #: are 94% agreement, noise rather than drift.
    min_tokens: int = 64


#: Defaults per model id (``"default"`` for any other). Reasoning: llama.cpp measures q8_0 K+V on
#: a 7B model at a mean KLD of about 0.001 with the top token almost always kept; small models are
#: more fragile (a 350M model's top-1 flips at q8). So a mean KLD ten times that (0.01), a p99 of
#: 0.1 (rare positions may be close calls between two tokens) and 95% top-1 agreement are loose
#: enough for healthy INT8 on small models (SmolLM2-135M measures a mean KLD of 5e-5, p99 8e-4,
#: 99.9% top-1 agreement over 2 x 1,024 tokens, see docs/int8.md) and tight enough to catch a
#: broken layer (on random-tiny, zeroed K or V scales or 128x coarsened ones in a layer).
DEFAULT_THRESHOLDS: Mapping[str, DriftThresholds] = {
    "default": DriftThresholds(kld_mean=0.01, kld_p99=0.1, top1_agreement=0.95),
}


def thresholds_for(model_id: str,
                   overrides: Mapping[str, DriftThresholds] | None = None) -> DriftThresholds:
    table = {**DEFAULT_THRESHOLDS, **(overrides or {})}
    return table.get(model_id, table["default"])


@dataclass(frozen=True, kw_only=True, slots=True)
class Figures:
    """KLD and top-1 agreement over a set of positions."""

    tokens: int
    kld_mean: float
    kld_p99: float
    top1_agreement: float

    @classmethod
    def of(cls, kld: torch.Tensor, agree: torch.Tensor) -> Figures:
        if kld.numel() == 0:
            return cls(tokens=0, kld_mean=0.0, kld_p99=0.0, top1_agreement=1.0)
        return cls(tokens=int(kld.numel()), kld_mean=float(kld.mean()),
                   kld_p99=float(torch.quantile(kld, 0.99)),
                   top1_agreement=float(agree.float().mean()))


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerError:
    """A layer's dequantized K and V against full precision: ``||x - x̂|| / ||x||``."""

    layer: int
    k_rel_error: float
    v_rel_error: float


@dataclass(frozen=True, kw_only=True)
class DriftReport:
    model: str
    kv_dtype: str
    prompts: int
    max_tokens: int
    overall: Figures
    buckets: dict[str, Figures]
    first_divergence: list[int]  # per prompt; ``max_tokens`` when the greedy outputs never part
    layers: list[LayerError]
    thresholds: DriftThresholds
    exceeded: list[str] = field(default_factory=list)
    #: Wall seconds of the greedy generations: ``reference`` (full precision) and ``int8``.
    generate_seconds: dict[str, float] = field(default_factory=dict)
    #: ``"audit"`` (the corpus, :func:`measure`) or ``"sampler"`` (finished requests re-run in
    #: the background, ``gpu_prefix.drift_sampler``; no greedy generations, so no divergence).
    source: str = "audit"
    #: What the guard did: ``""`` (nothing), ``"model"`` (INT8 off), ``"layers:0,3"``.
    action: str = ""

    @property
    def first_divergence_median(self) -> float:
        return float(statistics.median(self.first_divergence)) if self.first_divergence else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "kv_dtype": self.kv_dtype, "prompts": self.prompts,
            "max_tokens": self.max_tokens, **asdict(self.overall),
            "first_divergence": list(self.first_divergence),
            "first_divergence_median": self.first_divergence_median,
            "buckets": {name: asdict(f) for name, f in self.buckets.items()},
            "layers": [asdict(e) for e in self.layers], "thresholds": asdict(self.thresholds),
            "exceeded": list(self.exceeded), "generate_seconds": dict(self.generate_seconds),
            "source": self.source, "action": self.action,
        }


def corpus(engine: Engine, *, prompts: int = 3, seed: int = 0) -> list[list[int]]:
    """``prompts`` prompts of :data:`PROMPTS`, chosen by ``seed``, through the chat template."""
    chosen = random.Random(seed).sample(PROMPTS, k=min(prompts, len(PROMPTS)))
    return [engine.chat_prompt_ids([{"role": "user", "content": text}]) for text in chosen]


def check(figures: Mapping[str, Figures], t: DriftThresholds) -> list[str]:
    """What is over the thresholds, one line each (empty: within them)."""
    out = []
    for name, f in figures.items():
        if f.tokens < t.min_tokens:
            continue
        if f.kld_mean > t.kld_mean:
            out.append(f"{name}: mean KLD {f.kld_mean:.4g} > {t.kld_mean:g}")
        if f.kld_p99 > t.kld_p99:
            out.append(f"{name}: p99 KLD {f.kld_p99:.4g} > {t.kld_p99:g}")
        if f.top1_agreement < t.top1_agreement:
            out.append(f"{name}: top-1 agreement {f.top1_agreement:.4f} < {t.top1_agreement:g}")
    return out


def _first_divergence(a: Sequence[int], b: Sequence[int], n: int) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b), n))


def kld_top1(ref_logits: torch.Tensor, q_logits: torch.Tensor,
             chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: ``KL(P_ref || P_q)`` (in float64, a few rows at a time: a 1,000-token run
    over a 49k vocabulary is 200 MB per copy) and whether the top tokens agree."""
    klds = []
    for a in range(0, len(ref_logits), chunk):
        p = torch.log_softmax(ref_logits[a : a + chunk].double(), dim=-1)
        q = torch.log_softmax(q_logits[a : a + chunk].double(), dim=-1)
        klds.append((p.exp() * (p - q)).sum(dim=-1).clamp_min(0.0))
    return torch.cat(klds), ref_logits.argmax(dim=-1) == q_logits.argmax(dim=-1)


class LayerErrorSum:
    """Each layer's quantization error summed over sequences: quantize full-precision K/V in
    scratch storage like ``quant`` (its rules, a planted fault too), read it back, compare."""

    def __init__(self, quant: QuantizedKV) -> None:
        self.quant = quant
        self.num = torch.zeros((quant.num_layers, 2), dtype=torch.float64)
        self.den = torch.zeros_like(self.num)

    def add(self, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One sequence: its K and V per layer (``[H, N, D]`` each), positions ``0..N``."""
        n = kv[0][0].shape[1]
        # NOTE: every layer INT8 here, whatever the pool keeps in full precision now: the error
        # says what INT8 would cost in each layer, the attribution the guard needs.
        scratch = self.quant.like(-(-n // self.quant.block_size), full_layers=frozenset())
        slots = torch.arange(n, device=kv[0][0].device)
        for i, (k, v) in enumerate(kv):
            scratch.write(i, slots, k, v)
            k2, v2 = scratch.read(i, slots)
            self.num[i, 0] += float((k - k2).double().norm() ** 2)
            self.num[i, 1] += float((v - v2).double().norm() ** 2)
            self.den[i, 0] += float(k.double().norm() ** 2)
            self.den[i, 1] += float(v.double().norm() ** 2)

    def result(self) -> list[LayerError]:
        rel = (self.num / self.den.clamp_min(1e-30)).sqrt()
        return [LayerError(layer=i, k_rel_error=float(rel[i, 0]), v_rel_error=float(rel[i, 1]))
                for i in range(len(rel))]


def layer_errors(engine: Engine, sequences: Sequence[Sequence[int]],
                 quant: QuantizedKV) -> list[LayerError]:
    """Each layer's K/V quantized by ``quant``'s scale rules against full precision, over the
    full-precision K/V of ``sequences`` (one plain forward each)."""
    errors = LayerErrorSum(quant)
    for tokens in sequences:
        with torch.inference_mode():
            out = engine.model(input_ids=torch.tensor([list(tokens)], device=engine.device),
                               use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        errors.add([(layer.keys[0], layer.values[0]) for layer in cache.layers])
    return errors.result()


#: A layer is singled out when its K or V error is over both of these: an absolute floor
#: (healthy INT8 measures 0.3-1.3% on SmolLM2 and random-tiny) and this many times the lower
#: median of all layers' errors (a broken layer stands out by one to two orders of magnitude).
LAYER_ERROR_FLOOR = 0.05
LAYER_ERROR_OUTLIER = 10.0


def attribute(layers: Sequence[LayerError]) -> frozenset[int]:
    """The layers a drift can be pinned on (empty: none stands out, so the model as a whole)."""
    if not layers:
        return frozenset()
    worst = [max(e.k_rel_error, e.v_rel_error) for e in layers]
    bar = max(LAYER_ERROR_FLOOR, LAYER_ERROR_OUTLIER * statistics.median_low(worst))
    return frozenset(e.layer for e, w in zip(layers, worst, strict=True) if w > bar)


def enforce(engine: Engine, report: DriftReport, *, per_layer: bool = True) -> DriftReport:
    """The guard's action for ``report``: nothing within the thresholds; over them, INT8 off
    for the layers :func:`attribute` singles out that are still INT8 (``per_layer``), else for
    the whole model. Returns the report with ``action`` saying which."""
    if not report.exceeded or engine.kv_dtype != "int8":
        return report
    reason = "; ".join(report.exceeded)
    # NOTE: layers already in full precision are no longer to blame; with none left (or every
    # layer blamed: kv_switch widens that to the model) INT8 goes off for the whole model.
    bad = (attribute(report.layers) - engine.int8_full_layers) if per_layer else frozenset()
    engine.disable_int8(reason, layers=bad or None)
    if engine.kv_dtype != "int8":
        return replace(report, action="model")
    return replace(report, action="layers:" + ",".join(map(str, sorted(bad))))


def measure(reference: Engine, quantized: Engine, prompts: Sequence[Sequence[int]], *,
            max_tokens: int, thresholds: DriftThresholds | None = None,
            per_layer: bool = True) -> DriftReport:
    """Drift of ``quantized`` (an INT8 engine) against ``reference`` (full precision, same
    weights) on ``prompts``, ``max_tokens`` greedy tokens each (end-of-sequence suppressed, so
    every generation is that long)."""
    from gpu_prefix.engine import GenerationParams

    quant = quantized.pool.quant
    if quant is None:
        raise ValueError("the quantized engine's pool is not INT8 (or its INT8 was turned off)")
    params = GenerationParams(max_tokens=max_tokens, min_tokens=max_tokens)
    klds, agrees, firsts, continuations = [], [], [], []
    seconds = {"reference": 0.0, "int8": 0.0}
    for prompt in prompts:
        t0 = time.perf_counter()
        ref = list(reference.generate(prompt, params).token_ids)
        t1 = time.perf_counter()
        got = list(quantized.generate(prompt, params).token_ids)
        seconds["reference"] += t1 - t0
        seconds["int8"] += time.perf_counter() - t1
        firsts.append(_first_divergence(ref, got, max_tokens))
        kld, agree = kld_top1(reference.teacher_forced_logits(prompt, ref),
                              quantized.teacher_forced_logits(prompt, ref))
        klds.append(kld)
        agrees.append(agree)
        continuations.append(list(prompt) + ref)
    buckets = {}
    for name, a, b in BUCKETS:
        buckets[name] = Figures.of(torch.cat([k[a:b] for k in klds]),
                                   torch.cat([g[a:b] for g in agrees]))
    overall = Figures.of(torch.cat(klds), torch.cat(agrees))
    t = thresholds or thresholds_for(quantized.model_id, quantized.drift_thresholds)
    return DriftReport(
        model=quantized.model_id, kv_dtype="int8", prompts=len(prompts), max_tokens=max_tokens,
        overall=overall, buckets=buckets, first_divergence=firsts,
        layers=layer_errors(quantized, continuations, quant) if per_layer else [],
        thresholds=t, exceeded=check({"all": overall, **buckets}, t), generate_seconds=seconds,
    )


def reference_engine(engine: Engine, *, max_tokens: int, longest_prompt: int) -> Engine:
    """A full-precision engine over ``engine``'s weights, its pool just big enough for one
    sequence of the audit (what the guard measures against)."""
    from gpu_prefix.engine import Engine as _Engine
    from gpu_prefix.models import LoadedModel

    bs = engine.pool.block_size
    blocks = -(-(longest_prompt + max_tokens) // bs) + 2
    block_bytes = engine.shape.bytes_per_token() * bs
    return _Engine(LoadedModel(name=engine.model_id, model=engine.model,
                               tokenizer=engine.tokenizer),
                   pool_bytes=int(blocks / 0.8 + 1) * block_bytes, block_size=bs, max_running=1,
                   max_batch_tokens=max(512, bs + 1), max_tokens_limit=max_tokens,
                   model_id=engine.model_id)


def guard(engine: Engine, prompts: Sequence[Sequence[int]], *, max_tokens: int,
          thresholds: DriftThresholds | None = None, per_layer: bool = True) -> DriftReport:
    """Measure ``engine``'s INT8 drift against full precision on ``prompts`` and, above its
    thresholds, turn its INT8 off (:func:`enforce`: for the layers it can be pinned on, else for
    the model). The report says what was over and what was done."""
    ref = reference_engine(engine, max_tokens=max_tokens, longest_prompt=max(map(len, prompts)))
    try:
        report = measure(ref, engine, prompts, max_tokens=max_tokens, thresholds=thresholds,
                         per_layer=per_layer)
    finally:
        ref.close()
    report = enforce(engine, report, per_layer=per_layer)
    engine.last_drift = report
    return report
