"""Prefix reuse benchmark: time to first token and throughput for a shared-prefix workload.

Variants, all measured in this run on the same model, device and prompts:

- ``recompute``: no cache, a full forward of prefix + suffix;
- ``store``: this project's engine (admission, chained hashes, verified match, pinning, the
  suffix forward with attention reading the prefix in the paged pool in place, indexing of the
  new blocks, first token);
- ``transformers_copy``: transformers' documented prompt-reuse recipe, ``copy.deepcopy`` of a
  prefilled ``DynamicCache`` per request, then the suffix forward;
- ``ideal``: the suffix forward on a ready ``DynamicCache``, no store and no copy (a bound).

Then a many-requests-few-system-prompts mix (store vs recompute vs the copy recipe), and the
memory held for many prompts that share a system prompt: the pool (blocks shared) against one
deep-copied cache per prompt. ``--json`` prints one JSON object with the ratios.

    .venv/bin/python bench/prefix.py                  # SmolLM2-135M-Instruct, CPU, float32
    .venv/bin/python bench/prefix.py --model random-tiny --reps 3
    .venv/bin/python bench/prefix.py --device cuda    # when a GPU is present
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import DynamicCache

from gpu_prefix.engine import Engine, GenerationParams
from gpu_prefix.hashing import block_hashes
from gpu_prefix.models import load_model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "random-tiny"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prefix", type=int, default=1024, help="shared prefix tokens")
    ap.add_argument("--suffix", type=int, default=32, help="per-request suffix tokens")
    ap.add_argument("--reps", type=int, default=7,
                    help="timed requests per variant (median reported)")
    ap.add_argument("--system-prompts", type=int, default=4,
                    help="distinct system prompts in the mix")
    ap.add_argument("--mix-requests", type=int, default=24, help="requests in the mix")
    ap.add_argument("--mix-prefix", type=int, default=512, help="system prompt tokens in the mix")
    ap.add_argument("--pool-mb", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default); 1 is steadier on a busy machine")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here")

    torch.set_grad_enabled(False)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=torch.float32)
    model = loaded.model
    engine = Engine(loaded, pool_bytes=args.pool_mb * 2**20, max_running=4)
    rng = random.Random(args.seed)
    lo, hi = (100, min(engine.vocab_size, 30000))
    prefix = [rng.randrange(lo, hi) for _ in range(args.prefix)]
    suffixes = [[rng.randrange(lo, hi) for _ in range(args.suffix)] for _ in range(args.reps + 1)]
    dev = args.device
    salt = engine.scope_salt_for("bench")
    greedy = GenerationParams(max_tokens=1, temperature=0.0, scope_salt=salt)

    def first_token(logits: torch.Tensor) -> int:
        return int(torch.argmax(logits[0, -1]))

    def recompute(sfx):
        ids = torch.tensor([prefix + sfx], device=dev)
        return first_token(model(input_ids=ids, logits_to_keep=1).logits)

    prefilled = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prefix], device=dev), cache=prefilled)

    def copy_recipe(sfx):
        cache = copy.deepcopy(prefilled)
        return first_token(model(input_ids=torch.tensor([sfx], device=dev), cache=cache,
                                 logits_to_keep=1).logits)

    def ideal(sfx):
        out = first_token(model(input_ids=torch.tensor([sfx], device=dev), cache=prefilled,
                                logits_to_keep=1).logits)
        prefilled.crop(-len(sfx))
        return out

    cached_tokens: list[int] = []

    def store(sfx):
        cached_tokens.append(engine.generate(prefix + sfx, greedy).cached_tokens)

    # Warm everything (allocator, kernels) and put the prefix in the pool.
    for fn in (recompute, copy_recipe, ideal, store):
        fn(suffixes[-1])
    times: dict[str, list[float]] = {k: [] for k in ("recompute", "store", "transformers_copy",
                                                     "ideal")}
    cached_tokens.clear()
    for sfx in suffixes[: args.reps]:
        # Interleaved, so machine noise hits every variant alike.
        times["recompute"].append(timed(lambda: recompute(sfx), dev))
        times["transformers_copy"].append(timed(lambda: copy_recipe(sfx), dev))
        times["ideal"].append(timed(lambda: ideal(sfx), dev))
        times["store"].append(timed(lambda: store(sfx), dev))
    med = {k: statistics.median(v) for k, v in times.items()}

    # The store's own work, without the model: hashing, a lease, the verified match, blocks for
    # the suffix, indexing the new full blocks, release. Timed apart from the forward so
    # machine noise in the forward cannot hide or fake it. (No copy: attention reads the pool.)
    ops_ms = []
    bs = engine.pool.block_size
    for _ in suffixes[: args.reps]:
        ids = prefix + [rng.randrange(lo, hi) for _ in range(args.suffix)]
        sync(dev)
        t0 = time.perf_counter()
        chain = block_hashes(ids, engine._block_keys(ids, greedy), block_size=bs)
        lease = engine.store.open()
        m = engine.store.match(lease, chain[: (len(ids) - 1) // bs])
        while len(lease.table) * bs < len(ids):
            engine.store.allocate(lease)
        for item in chain[len(m.block_ids):]:
            engine.store.adopt(lease, item)
        engine.store.release(lease)
        sync(dev)
        ops_ms.append((time.perf_counter() - t0) * 1000)
    store_ops_ms = statistics.median(ops_ms)

    # Exactness: the store's first-token logits against a full forward.
    diffs = []
    for sfx in suffixes[:3]:
        reuse, _cached = engine.next_token_logits(prefix + sfx, scope_salt=salt)
        full = model(input_ids=torch.tensor([prefix + sfx], device=dev),
                     logits_to_keep=1).logits[0, -1]
        diffs.append(float((reuse - full).abs().max()))
    max_diff = max(diffs)

    # Mix: many requests over a few system prompts, first sight of each is a miss everywhere.
    systems = [
        [rng.randrange(lo, hi) for _ in range(args.mix_prefix)] for _ in range(args.system_prompts)]
    mix = [(rng.randrange(args.system_prompts), [rng.randrange(lo, hi) for _ in range(args.suffix)])
           for _ in range(args.mix_requests)]
    mix_engine = Engine(loaded, pool_bytes=args.pool_mb * 2**20, max_running=4)
    mix_salt = mix_engine.scope_salt_for("bench")

    def run_mix_store():
        out = []
        for s, sfx in mix:
            out.append(timed(lambda: mix_engine.generate(systems[s] + sfx, GenerationParams(
                max_tokens=1, temperature=0.0, scope_salt=mix_salt)), dev))
        return out

    def run_mix_copy():
        caches: dict[int, DynamicCache] = {}
        out = []
        for s, sfx in mix:
            def one():
                if s not in caches:
                    c = DynamicCache(config=model.config)
                    model(input_ids=torch.tensor([systems[s]], device=dev), cache=c)
                    caches[s] = c
                cache = copy.deepcopy(caches[s])
                first_token(model(input_ids=torch.tensor([sfx], device=dev), cache=cache,
                                  logits_to_keep=1).logits)
            out.append(timed(one, dev))
        return out

    def run_mix_recompute():
        return [timed(lambda: first_token(model(
            input_ids=torch.tensor([systems[s] + sfx], device=dev),
            logits_to_keep=1).logits), dev) for s, sfx in mix]

    mix_times = {"recompute": run_mix_recompute(), "store": run_mix_store(),
                 "transformers_copy": run_mix_copy()}

    # Memory held for the mix's prompts: the pool's used bytes (shared system blocks + each
    # request's own full blocks) against one deep-copied cache per prompt (what the recipe holds
    # to keep every prompt's state reusable).
    per_token = engine.shape.bytes_per_token()
    pool_bytes_used = mix_engine.stats().used_bytes
    copy_bytes = sum((len(systems[s]) + len(sfx)) * per_token for s, sfx in mix)

    result = {
        "model": args.model,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "prefix_tokens": args.prefix,
        "suffix_tokens": args.suffix,
        "cached_tokens": min(cached_tokens),
        "ttft_s": med,
        "requests_per_s": {k: 1.0 / v for k, v in med.items()},
        "prompt_tokens_per_s": {k: (args.prefix + args.suffix) / v for k, v in med.items()},
        "ttft_speedup_vs_recompute": med["recompute"] / med["store"],
        "ttft_ideal_speedup": med["recompute"] / med["ideal"],
        "ttft_store_over_ideal": med["store"] / med["ideal"],
        "ttft_vs_transformers_copy": med["transformers_copy"] / med["store"],
        "store_overhead_ms": (med["store"] - med["ideal"]) * 1000,
        "store_ops_ms": store_ops_ms,
        "store_ops_fraction_of_ideal": store_ops_ms / 1000 / med["ideal"],
        "max_abs_logit_diff": max_diff,
        "mix": {
            "requests": args.mix_requests,
            "system_prompts": args.system_prompts,
            "system_prompt_tokens": args.mix_prefix,
            "mean_ttft_s": {k: statistics.fmean(v) for k, v in mix_times.items()},
            "requests_per_s": {k: len(v) / sum(v) for k, v in mix_times.items()},
            "pool_bytes": pool_bytes_used,
            "transformers_copy_bytes": copy_bytes,
        },
        "bytes_vs_transformers_copy": pool_bytes_used / copy_bytes,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"prefix reuse: {args.model} on {args.device} (float32, {torch.get_num_threads()} "
          "threads), "
          f"{args.prefix}-token prefix + {args.suffix}-token suffix, median of {args.reps}")
    print(f"{'variant':<20}{'TTFT ms':>10}{'req/s':>10}{'prompt tok/s':>14}")
    for k in ("recompute", "transformers_copy", "ideal", "store"):
        print(
            f"{k:<20}{med[k] * 1000:>10.1f}{1 / med[k]:>10.2f}"
            f"{(args.prefix + args.suffix) / med[k]:>14.0f}")
    print(f"cached tokens per request (store): {min(cached_tokens)}")
    print(f"ttft_speedup_vs_recompute  {result['ttft_speedup_vs_recompute']:.2f}x  "
          f"(ideal {result['ttft_ideal_speedup']:.2f}x)")
    print(f"store / ideal              {result['ttft_store_over_ideal']:.3f}  "
          f"(overhead {result['store_overhead_ms']:.1f} ms; goal <= 1.20)")
    print(f"store's own work           {store_ops_ms:.2f} ms per request (hash, lease, match, "
          "allocate, index), "
          f"{100 * result['store_ops_fraction_of_ideal']:.1f}% of the ideal TTFT")
    print(f"ttft_vs_transformers_copy  {result['ttft_vs_transformers_copy']:.2f}x  (>= 1: store at "
          "least as fast)")
    print(f"max_abs_logit_diff         {max_diff:.2e}")
    m = result["mix"]
    print(f"mix: {args.mix_requests} requests over {args.system_prompts} system prompts of "
          f"{args.mix_prefix} tokens")
    for k in ("recompute", "transformers_copy", "store"):
        print(f"  {k:<18} mean TTFT {m['mean_ttft_s'][k] * 1000:8.1f} ms   "
              f"{m['requests_per_s'][k]:6.2f} req/s")
    print(f"memory for the mix's prompts: pool {pool_bytes_used / 2**20:.1f} MiB vs one deep copy "
          "per prompt "
          f"{copy_bytes / 2**20:.1f} MiB -> bytes_vs_transformers_copy "
          f"{result['bytes_vs_transformers_copy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
