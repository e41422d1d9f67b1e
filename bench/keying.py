"""Keys per second for small, typical and large requests, against LiteLLM's cache key and a
plain sha256 of sorted JSON, measured in the same run; plus a correctness table.

    python bench/keying.py [--seconds S] [--json]      (make bench-keying: with LiteLLM)

``--json`` also prints one JSON object on the last line: ``small_vs_litellm``,
``typical_vs_litellm``, ``large_vs_litellm`` (ours over LiteLLM's ``get_cache_key``, keys per
CPU-second; goals >= 2 and >= 3 for typical and large), the rates per size and the correctness
table. LiteLLM is optional (`pip install '.[bench]'`); without it its column is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

# NOTE: run as a script, this file's folder is first on sys.path and its own name would shadow
# the `keying` package; drop the folder before importing.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from keying import KeyParams, Scope, build_key  # noqa: E402

PARAMS = KeyParams(scope=Scope.for_tenant("bench"), epoch=1)


def _tool(i: int) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": f"tool_{i}",
            "description": "Look up an order by id and return its status and items. " * 2,
            "parameters": {
                "type": "object",
                "properties": {
                    "order_id": {"type": "string", "description": "The order id."},
                    "include_items": {"type": "boolean"},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                },
                "required": ["order_id"],
            },
        },
    }


def requests() -> dict[str, dict[str, Any]]:
    small = {
        "model": "gpt-4o-mini",
        "temperature": 0,
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France? Answer in one word."},
        ],
    }
    typical_msgs = [{"role": "system", "content": "You are a support agent. " * 20}]
    for i in range(6):
        typical_msgs.append({"role": "user", "content": f"Question {i}: " + "where is it? " * 12})
        typical_msgs.append({"role": "assistant", "content": f"Answer {i}: " + "it ships. " * 12})
    typical = {
        "model": "gpt-4o",
        "temperature": 0,
        "seed": 7,
        "messages": typical_msgs,
        "tools": [_tool(i) for i in range(4)],
        "tool_choice": "auto",
    }
    large = {
        "model": "gpt-4o",
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "Summarise the document."},
            {"role": "user", "content": "lorem ipsum dolor sit amet " * 3700},
        ],
    }
    return {"small": small, "typical": typical, "large": large}


def ours(req: dict[str, Any]) -> bytes:
    return build_key(req, PARAMS).digest


def plain_sha256(req: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()


def load_litellm() -> Callable[[dict[str, Any]], str] | None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        from litellm.caching.caching import Cache
    except Exception:  # noqa: BLE001 - optional
        return None
    cache = Cache()
    return lambda req: cache.get_cache_key(**req)


def rates(
    fns: dict[str, Callable[[dict[str, Any]], Any]], req: dict[str, Any], seconds: float,
    rounds: int = 5,
) -> dict[str, float]:
    """Keys per second of CPU time for each function, best of interleaved rounds.

    NOTE: CPU time of this thread (not wall time), and rounds interleaved across the functions,
    so that other load on the machine does not favour whichever function ran in a quiet moment.
    """
    best = dict.fromkeys(fns, 0.0)
    for fn in fns.values():
        fn(req)
    for _ in range(rounds):
        for name, fn in fns.items():
            n, batch = 0, 8
            start = time.thread_time()
            while True:
                for _ in range(batch):
                    fn(req)
                n += batch
                elapsed = time.thread_time() - start
                if elapsed >= seconds / rounds:
                    break
                batch = min(batch * 2, 2048)
            best[name] = max(best[name], n / elapsed)
    return best


def correctness_cases() -> list[tuple[str, dict[str, Any], dict[str, Any], bool]]:
    """(name, a, b, must_share_key). A wrong answer is b served for a when they must not share."""
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    return [
        ("omitted temperature is 1, not 0", base, {**base, "temperature": 0}, False),
        ("max_tokens in key", {**base, "max_tokens": 5}, {**base, "max_tokens": 500}, False),
        ("seed in key", {**base, "seed": 1}, {**base, "seed": 2}, False),
        ("top_k in key", {**base, "top_k": 1}, {**base, "top_k": 50}, False),
        ("reasoning_effort in key", {**base, "reasoning_effort": "low"},
         {**base, "reasoning_effort": "high"}, False),
        ("provider option in key", {**base, "x_safe_mode": True},
         {**base, "x_safe_mode": False}, False),
        ("tool_choice in key", {**base, "tool_choice": "auto"},
         {**base, "tool_choice": "required"}, False),
        ("user does not split", {**base, "user": "a"}, {**base, "user": "b"}, True),
        ("key order folds", {"messages": base["messages"], "model": "m"}, base, True),
        ("1 vs 1.0 folds", {**base, "temperature": 1}, {**base, "temperature": 1.0}, True),
        ("text part folds", base,
         {**base, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
         True),
    ]


def score(fn: Callable[[dict[str, Any]], Any]) -> tuple[int, int, int, list[str]]:
    """(correct, wrong answers, needless misses, names of failures)."""
    ok = wrong = misses = 0
    failed = []
    for name, a, b, share in correctness_cases():
        try:
            same = fn(a) == fn(b)
        except Exception:  # noqa: BLE001 - a refusal is a miss, never a wrong answer
            same = False
        if same == share:
            ok += 1
        elif same:
            wrong += 1
            failed.append(f"WRONG ANSWER: {name}")
        else:
            misses += 1
            failed.append(f"needless miss: {name}")
    return ok, wrong, misses, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="CPU seconds per function and size")
    ap.add_argument("--json", action="store_true",
                    help="also print one JSON object on the last line")
    args = ap.parse_args()

    litellm_key = load_litellm()
    fns: dict[str, Callable[[dict[str, Any]], Any]] = {"ours": ours, "sha256_json": plain_sha256}
    if litellm_key is not None:
        fns["litellm"] = litellm_key
    result: dict[str, Any] = {"sizes": {}, "correctness": {}}
    for size, req in requests().items():
        row = {"request_bytes": len(json.dumps(req))}
        for name, r in rates(fns, req, args.seconds).items():
            row[f"{name}_keys_per_s"] = r
        if "litellm" in fns:
            row["speedup_vs_litellm"] = row["ours_keys_per_s"] / row["litellm_keys_per_s"]
        row["ratio_vs_sha256_json"] = row["ours_keys_per_s"] / row["sha256_json_keys_per_s"]
        result["sizes"][size] = row
    for name, fn in fns.items():
        ok, wrong, misses, failed = score(fn)
        result["correctness"][name] = {"correct": ok, "wrong_answers": wrong,
                                       "needless_misses": misses, "failures": failed}

    for size, row in result["sizes"].items():
        if "speedup_vs_litellm" in row:
            result[f"{size}_vs_litellm"] = row["speedup_vs_litellm"]
    print(f"{'size':8} {'bytes':>7} " + " ".join(f"{n + ' keys/s':>20}" for n in fns)
          + f" {'vs litellm':>11} {'vs sha256':>10}")
    for size, row in result["sizes"].items():
        cols = " ".join(f"{row[f'{n}_keys_per_s']:>20,.0f}" for n in fns)
        vs_l = f"{row['speedup_vs_litellm']:>10.2f}x" if "speedup_vs_litellm" in row else " " * 11
        print(f"{size:8} {row['request_bytes']:>7} {cols} {vs_l} "
              f"{row['ratio_vs_sha256_json']:>9.2f}x")
    n_cases = len(correctness_cases())
    print(f"\ncorrectness ({n_cases} cases: must-differ and must-share pairs)")
    for name, c in result["correctness"].items():
        print(f"  {name:12} correct {c['correct']}/{n_cases}, wrong answers {c['wrong_answers']},"
              f" needless misses {c['needless_misses']}")
        for f in c["failures"]:
            print(f"      {f}")
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
