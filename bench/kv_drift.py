"""INT8 KV drift and cost benchmark: SmolLM2-135M-Instruct (CPU, float32) with a full-precision
KV pool and with an INT8 one, on the drift audit's fixed corpus (``gpu_prefix.drift``), all in
this run.

- drift: ``kld_mean``, ``kld_p99`` (KL divergence of the next-token distributions, INT8 against
  full precision, teacher-forced on the full-precision greedy continuation), ``top1_agreement``,
  ``first_divergence_median`` (first position where the two greedy outputs part; ``max_tokens``
  when they never do), the same by position bucket (0-128, 128-512, 512+), per-layer K/V error;
- cost: ``kv_bytes_ratio``, the INT8 pool's bytes per token (codes and scales) over the
  full-precision pool's (the model's dtype: float32 here), and ``kv_bytes_ratio_fp16``, the same
  for a float16 model (float16 K/V against INT8 with float16 scales, the arithmetic
  ``cachesvc capacity`` shares with the pool); ``decode_speed_ratio``, INT8 greedy tokens per
  second over full precision's on the same prompts (above 1: INT8 faster).

Generations ignore end-of-sequence until ``--max-tokens``, so both do the same work.
``--json`` prints one JSON object on the last line.

    nice -n 10 .venv/bin/python bench/kv_drift.py --json               # 2 prompts x 1,024 tokens
    .venv/bin/python bench/kv_drift.py --model random-tiny --max-tokens 600
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from gpu_prefix.capacity import block_bytes_for
from gpu_prefix.drift import corpus, measure, thresholds_for
from gpu_prefix.engine import Engine
from gpu_prefix.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "random-tiny"))
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--no-per-layer", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    pool = 128 * 2**20
    full = Engine(loaded, pool_bytes=pool, max_tokens_limit=args.max_tokens, model_id=args.model)
    int8 = Engine(loaded, pool_bytes=pool, max_tokens_limit=args.max_tokens, model_id=args.model,
                  kv_dtype="int8")
    try:
        prompts = corpus(full, prompts=args.prompts, seed=args.seed)
        report = measure(full, int8, prompts, max_tokens=args.max_tokens,
                         thresholds=thresholds_for(args.model),
                         per_layer=not args.no_per_layer)
    finally:
        full.close()
        int8.close()
    shape = full.shape
    geometry = dict(layers=shape.num_layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                    block_size=16)
    fp16_ratio = (block_bytes_for(**geometry, kv_dtype="int8", scale_bytes=2)
                  / block_bytes_for(**geometry, kv_dtype="float16"))
    secs = report.generate_seconds
    out = {
        "model": args.model, "dtype": str(shape.dtype).removeprefix("torch."),
        "prompts": args.prompts,
        "max_tokens": args.max_tokens, "threads": torch.get_num_threads(),
        "kld_mean": report.overall.kld_mean, "kld_p99": report.overall.kld_p99,
        "top1_agreement": report.overall.top1_agreement,
        "first_divergence_median": report.first_divergence_median,
        "first_divergence": report.first_divergence,
        "kv_bytes_ratio": int8.pool.block_bytes / full.pool.block_bytes,
        "kv_bytes_ratio_fp16": fp16_ratio,
        "decode_speed_ratio": secs["reference"] / secs["int8"],
        "generate_seconds": secs,
        "buckets": report.as_dict()["buckets"], "layers": report.as_dict()["layers"],
        "exceeded": report.exceeded,
    }
    if not args.json:
        for name, f in {"all": report.overall, **report.buckets}.items():
            print(f"{name:8s} tokens {f.tokens:6d}  KLD mean {f.kld_mean:.3g}  p99 {f.kld_p99:.3g} "
                  " "
                  f"top-1 {f.top1_agreement:.4f}")
        print(f"first divergence {report.first_divergence}  kv bytes ratio "
              f"{out['kv_bytes_ratio']:.3f} "
              f"(fp16: {fp16_ratio:.3f})  decode speed ratio {out['decode_speed_ratio']:.3f}")
        verdict = "; ".join(report.exceeded) if report.exceeded else "within thresholds"
        print("verdict: " + verdict)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
