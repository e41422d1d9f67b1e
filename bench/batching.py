"""Continuous batching benchmark: the seed's tail-latency scenario, a burst, throughput, exactness.

All measured in this run, on the same model, device and machine:

- the seed's scenario: one long generation (2,000 tokens) plus seven short ones (100 tokens):
  three arrive with it, four during it. Run FIFO (one request at a time: the engine with
  ``max_running=1``), with static batching (the requests present when the engine is idle form
  a batch; the batch's answers come back when its longest request ends; arrivals wait for the
  next batch), and continuously (this engine). ``short_p50_speedup_vs_fifo`` is the short
  requests' median latency FIFO over continuous; ``long_slowdown`` the long request's latency
  continuous over alone (FIFO runs it first, alone; the others arrive 50 ms after it);
- a burst of 50 requests into an idle engine: p99 time to first token and how many were
  refused;
- throughput (generated tokens per second) at 1, 4, 8 and 16 concurrent requests against the
  same requests one at a time, and against transformers' own continuous batching
  (``generate_batch``, its paged cache and scheduler) on the same 8-request workload;
- exactness: greedy batched output against transformers' ``generate`` on each request alone,
  and next-token logits through in-place attention (a prefix read from shared pool blocks)
  against a full forward.

Generations ignore end-of-sequence until their token count (``min_tokens``), so every variant
does the same work. ``--json`` prints one JSON object on the last line.

    .venv/bin/python bench/batching.py                   # SmolLM2-135M-Instruct, CPU, float32
    .venv/bin/python bench/batching.py --model random-tiny --long-tokens 400
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from gpu_prefix.engine import Engine, GenerationParams, TokenEvent
from gpu_prefix.errors import AdmissionRefusedError
from gpu_prefix.models import LoadedModel, load_model, smollm2_dir


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


class Timed:
    """A request's arrival, first token and end (seconds from the scenario's start)."""

    def __init__(self, name: str, arrival: float, prompt: list[int], tokens: int) -> None:
        self.name, self.arrival, self.prompt, self.tokens = name, arrival, prompt, tokens
        self.first: float | None = None
        self.end: float | None = None
        self.refused = False
        self.output: tuple[int, ...] = ()


def run_stream(engine: Engine, r: Timed, t0: float) -> None:
    params = GenerationParams(max_tokens=r.tokens, min_tokens=r.tokens, temperature=0.0)
    out: list[int] = []
    try:
        for ev in engine.generate_stream(r.prompt, params):
            if isinstance(ev, TokenEvent):
                if r.first is None:
                    r.first = time.perf_counter() - t0
                out.append(ev.token_id)
    except AdmissionRefusedError:
        r.refused = True
    r.end = time.perf_counter() - t0
    r.output = tuple(out)


def run_arrivals(engine: Engine, requests: list[Timed]) -> None:
    """Submit each request at its arrival time (its own thread), wait for all."""
    t0 = time.perf_counter()

    def go(r: Timed) -> None:
        delay = r.arrival - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        run_stream(engine, r, t0)

    threads = [threading.Thread(target=go, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_static(engine: Engine, requests: list[Timed]) -> None:
    """Static batching: whoever has arrived when the engine is idle forms the next batch; each
    request's answer is released when its batch ends."""
    t0 = time.perf_counter()
    pending = sorted(requests, key=lambda r: r.arrival)
    while pending:
        now = time.perf_counter() - t0
        if pending[0].arrival > now:
            time.sleep(pending[0].arrival - now)
            now = time.perf_counter() - t0
        batch = [r for r in pending if r.arrival <= now]
        pending = [r for r in pending if r.arrival > now]
        threads = [threading.Thread(target=run_stream, args=(engine, r, t0)) for r in batch]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        end = time.perf_counter() - t0
        for r in batch:
            r.end = end


def scenario(args: argparse.Namespace, loaded: LoadedModel, rng: random.Random) -> dict[str, Any]:
    vocab = min(loaded.tokenizer.vocab_size, 30000)
    prompt = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    long_prompt = prompt(args.prompt_tokens)
    shorts = [prompt(args.prompt_tokens) for _ in range(7)]
    # Calibrate "during it" from a short solo run: the four late arrivals come at 5-20% of
    # the long request's expected solo time.
    probe = Engine(loaded, pool_bytes=args.pool_mb * 2**20, max_running=1)
    t = time.perf_counter()
    probe.generate(shorts[0], GenerationParams(max_tokens=50, min_tokens=50))
    per_token = (time.perf_counter() - t) / 50
    probe.close()
    expected_long = per_token * args.long_tokens
    # "With it" is 50 ms after it, so the long request is first in line in every mode (FIFO
    # runs it first, alone: its FIFO latency is its latency alone).
    arrivals = [0.05, 0.05, 0.05] + [expected_long * f for f in (0.05, 0.10, 0.15, 0.20)]

    def requests() -> list[Timed]:
        rs = [Timed("long", 0.0, long_prompt, args.long_tokens)]
        rs += [Timed(f"short{i}", a, shorts[i], args.short_tokens) for i, a in enumerate(arrivals)]
        return rs

    out: dict[str, Any] = {"long_tokens": args.long_tokens, "short_tokens": args.short_tokens,
                           "arrivals_s": arrivals}
    modes = {"fifo": 1, "static": 8, "continuous": 8}
    for mode, max_running in modes.items():
        # NOTE: no queue timeout here: FIFO's requests wait minutes for the long one by design.
        engine = Engine(loaded, pool_bytes=args.pool_mb * 2**20, max_running=max_running,
                        max_batch_tokens=args.max_batch_tokens, queue_timeout_s=24 * 3600)
        rs = requests()
        (run_static if mode == "static" else run_arrivals)(engine, rs)
        engine.close()
        long, short = rs[0], rs[1:]
        out[mode] = {
            "long_latency_s": long.end - long.arrival,
            "short_latency_s": [r.end - r.arrival for r in short],
            "short_p50_s": statistics.median(r.end - r.arrival for r in short),
            "short_ttft_p50_s": statistics.median((r.first or r.end) - r.arrival for r in short),
            "refused": sum(r.refused for r in rs),
            "outputs": [r.output for r in rs],
        }
        print(f"  scenario {mode}: long {out[mode]['long_latency_s']:.1f} s, short p50 "
              f"{out[mode]['short_p50_s']:.2f} s", file=sys.stderr)
    same = all(out[m]["outputs"] == out["fifo"]["outputs"] for m in modes)
    for m in modes:
        del out[m]["outputs"]
    out["outputs_equal_across_modes"] = same
    out["short_p50_speedup_vs_fifo"] = out["fifo"]["short_p50_s"] / out["continuous"]["short_p50_s"]
    out["short_p50_speedup_vs_static"] = (out["static"]["short_p50_s"]
                                          / out["continuous"]["short_p50_s"])
    out["long_slowdown"] = out["continuous"]["long_latency_s"] / out["fifo"]["long_latency_s"]
    return out


def burst(args: argparse.Namespace, loaded: LoadedModel, rng: random.Random) -> dict[str, Any]:
    vocab = min(loaded.tokenizer.vocab_size, 30000)
    engine = Engine(loaded, pool_bytes=args.pool_mb * 2**20, max_running=args.burst_running,
                    max_batch_tokens=args.max_batch_tokens, max_queue=64)
    rs = [Timed(f"b{i}", 0.0, [rng.randrange(100, vocab) for _ in range(args.prompt_tokens)],
                args.burst_tokens)
          for i in range(args.burst)]
    t = time.perf_counter()
    run_arrivals(engine, rs)
    wall = time.perf_counter() - t
    s = engine.stats()
    engine.close()
    ttfts = [r.first for r in rs if r.first is not None]
    return {"requests": args.burst, "max_running": args.burst_running,
            "new_tokens": args.burst_tokens,
            "burst_p99_ttft_s": pct(ttfts, 99), "burst_p50_ttft_s": pct(ttfts, 50),
            "burst_refused": sum(r.refused for r in rs), "burst_wall_s": wall,
            "preempted": s.preempted_total}


def throughput(args: argparse.Namespace, loaded: LoadedModel, rng: random.Random) -> dict[str, Any]:
    vocab = min(loaded.tokenizer.vocab_size, 30000)
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_tokens)] for _ in range(16)]
    n_new = args.new_tokens
    engine = Engine(loaded, pool_bytes=args.pool_mb * 2**20, max_running=16,
                    max_batch_tokens=args.max_batch_tokens)
    params = GenerationParams(max_tokens=n_new, min_tokens=n_new, temperature=0.0)
    engine.generate(prompts[0][:8], GenerationParams(max_tokens=2))  # warm

    def concurrent(n: int) -> float:
        rs = [Timed(f"c{i}", 0.0, prompts[i], n_new) for i in range(n)]
        t = time.perf_counter()
        run_arrivals(engine, rs)
        return n * n_new / (time.perf_counter() - t)

    t = time.perf_counter()
    for p in prompts[:2]:
        engine.generate(p, params)
    sequential = 2 * n_new / (time.perf_counter() - t)
    tps = {n: concurrent(n) for n in (1, 4, 8, 16)}
    engine.close()

    # transformers' own continuous batching on the same 8 requests, its own model instance
    # (paged attention), in this run.
    tf = None
    if args.model == "smollm2" or args.transformers_cb:
        from transformers import AutoModelForCausalLM, GenerationConfig

        folder = smollm2_dir() if args.model == "smollm2" else None
        if folder is not None:
            cb_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            attn_implementation="paged|sdpa").eval()
            cfg = GenerationConfig(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                   eos_token_id=None, num_blocks=512, block_size=16,
                                   max_batch_tokens=512)
            with torch.inference_mode():
                cb_model.generate_batch(inputs=[prompts[0][:8]], generation_config=GenerationConfig(
                    max_new_tokens=2, do_sample=False, num_blocks=64, block_size=16,
                    max_batch_tokens=512))
                t = time.perf_counter()
                got = cb_model.generate_batch(inputs=prompts[:8], generation_config=cfg)
                wall = time.perf_counter() - t
            produced = sum(len(v.generated_tokens) for v in got.values())
            tf = produced / wall
            del cb_model
    out: dict[str, Any] = {"prompt_tokens": args.prompt_tokens, "new_tokens": n_new,
                           "tokens_per_s": {str(k): v for k, v in tps.items()},
                           "sequential_tokens_per_s": sequential,
                           "transformers_cb_tokens_per_s": tf}
    for n, v in tps.items():
        out[f"throughput_{n}_vs_sequential"] = v / sequential
    out["throughput_8_vs_transformers_cb"] = tps[8] / tf if tf else None
    return out


def exactness(args: argparse.Namespace, loaded: LoadedModel, rng: random.Random) -> dict[str, Any]:
    model = loaded.model
    vocab = min(loaded.tokenizer.vocab_size, 30000)
    engine = Engine(loaded, pool_bytes=args.pool_mb * 2**20, max_running=8,
                    max_batch_tokens=args.max_batch_tokens)
    salt = engine.scope_salt_for("bench")
    prefix = [rng.randrange(100, vocab) for _ in range(96)]
    prompts = [
        prefix + [rng.randrange(100, vocab) for _ in range(rng.randrange(5, 40))] for _ in range(6)]
    n = args.exact_tokens
    results: list[Any] = [None] * len(prompts)

    def go(i: int) -> None:
        results[i] = engine.generate(prompts[i],
                                     GenerationParams(max_tokens=n, min_tokens=n, scope_salt=salt))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    equal = True
    with torch.inference_mode():
        for p, r in zip(prompts, results, strict=True):
            ref = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
            equal &= list(ref[0, len(p):]) == list(r.token_ids)
        diffs = []
        for p in prompts[:3]:
            logits, cached = engine.next_token_logits(p, scope_salt=salt)
            full = model(input_ids=torch.tensor([p]), logits_to_keep=1).logits[0, -1]
            diffs.append(float((logits - full).abs().max()))
    engine.close()
    return {"greedy_equal": bool(equal), "max_abs_logit_diff": max(diffs),
            "cached_tokens_in_logit_check": cached}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "random-tiny"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--long-tokens", type=int, default=2000)
    ap.add_argument("--short-tokens", type=int, default=100)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=100,
                    help="tokens per request in the throughput runs")
    ap.add_argument("--burst", type=int, default=50)
    ap.add_argument("--burst-tokens", type=int, default=32)
    ap.add_argument("--burst-running", type=int, default=16)
    ap.add_argument("--exact-tokens", type=int, default=24)
    ap.add_argument("--max-batch-tokens", type=int, default=512)
    ap.add_argument("--pool-mb", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads for every variant (0: torch's default); 1 is steadier "
                         "on a busy machine")
    ap.add_argument("--skip", default="",
                    help="comma-separated parts to skip: scenario,burst,throughput,exact")
    ap.add_argument("--transformers-cb", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available here")
    torch.set_grad_enabled(False)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=torch.float32)
    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {"model": args.model, "device": args.device,
                              "torch_threads": torch.get_num_threads()}
    parts = {"exact": exactness, "burst": burst, "throughput": throughput, "scenario": scenario}
    for name, fn in parts.items():
        if name in skip:
            continue
        t = time.perf_counter()
        part = fn(args, loaded, random.Random(args.seed))
        print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
        result[name] = part
        for key in ("short_p50_speedup_vs_fifo", "short_p50_speedup_vs_static", "long_slowdown",
                    "burst_p99_ttft_s",
                    "burst_refused", "throughput_8_vs_sequential",
                    "throughput_8_vs_transformers_cb",
                    "max_abs_logit_diff", "greedy_equal"):
            if key in part:
                result[key] = part[key]
    if args.json:
        print(json.dumps(result))
        return 0
    print(json.dumps(result, indent=2))
    goals = [("short_p50_speedup_vs_fifo", ">=", 10), ("long_slowdown", "<=", 1.15),
             ("throughput_8_vs_transformers_cb", ">=", 1.0), ("max_abs_logit_diff", "<", 1e-4)]
    for key, op, goal in goals:
        v = result.get(key)
        if v is not None:
            ok = v >= goal if op == ">=" else v <= goal if op == "<=" else v < goal
            print(f"{key:<34} {v:10.4g}   goal {op} {goal}: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
