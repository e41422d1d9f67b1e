"""Get/set latency (p50, p99) and ops/s through the response store, against raw redis-py
GET/SET of the same bytes, measured in the same run on the same redis-server.

    python bench/store.py [--redis URL] [--ops N] [--concurrency C] [--json]

Without --redis it starts a private redis-server on a free port (and kills it at the end).
Two store paths are measured for 1 KB and 64 KB entries:

* ``store``: the store's bytes API (``RedisStore.get/set`` with a TTL), what the service calls;
* ``store+envelope``: the same plus encoding / decoding and verifying the entry envelope.

Ratios are store over raw: latency ratios above 1 and ops ratios below 1 are overhead. The
goal is under 15% (``p50_ratio_1k`` < 1.15). ``--json`` prints one JSON object.

It also prints what keeping the key material in each entry (``[cache] store_material``, the
default) costs: encoded bytes and encode+decode time per entry, with and without it, for the
small, typical and large requests of ``bench/keying.py`` and a 1 KB answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

from redis.asyncio import Redis  # noqa: E402

from bench._common import pct, start_private_redis  # noqa: E402
from cachesvc.store import (  # noqa: E402
    Entry,
    EntryKeys,
    decode_entry,
    encode_entry,
    open_store,
    storage_key,
)

#: Entries are signed as the service signs them (a keyed MAC under its secret).
KEYS = EntryKeys(b"bench-secret-0123456789abcdef")
from keying import Scope  # noqa: E402

SCOPE = Scope.for_tenant("bench")


def make_entry(size: int) -> Entry:
    """An entry whose encoded envelope is about ``size`` bytes."""
    text = "x" * max(0, size - 330)
    return Entry(
        scope=SCOPE, model="bench-model", model_version="1", epoch=1_700_000_000_000,
        created_at=time.time(), ttl=3600.0, digest=b"\x01" * 16, material_digest=b"\x02" * 32,
        response={"id": "cmpl-bench", "object": "chat.completion", "model": "bench-model",
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": text}}],
                  "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46}},
    )


def _words(n_bytes: int, seed: int = 0) -> str:
    """Text of random words from a 2000-word vocabulary: compresses about like prose (the
    keying bench's requests repeat one sentence and would flatter compression)."""
    import random

    rng = random.Random(seed)
    vocab = ["".join(rng.choice("etaoinshrdlucmfwypvbgkjqxz") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    out: list[str] = []
    size = 0
    while size < n_bytes:
        w = rng.choice(vocab)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def material_cost(repeat: int = 2000) -> dict[str, dict[str, float]]:
    """Per entry (1 KB answer), without and with its key material: stored bytes, the fill's
    encode time and the hit's decode time (the hit leaves compressed material packed)."""
    import importlib.util
    from dataclasses import replace

    from keying import KeyParams, build_key

    spec = importlib.util.spec_from_file_location("bench_keying", os.path.join(_HERE, "keying.py"))
    assert spec is not None and spec.loader is not None
    bench_keying = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_keying)
    bodies = dict(bench_keying.requests())
    for kb in (4, 30):
        bodies[f"prose-{kb}k"] = {"model": "m", "temperature": 0, "messages": [
            {"role": "system", "content": "Answer from the documents."},
            {"role": "user", "content": _words(kb * 1024, seed=kb)}]}
    out = {}
    for name, body in bodies.items():
        key = build_key(body, KeyParams(scope=SCOPE, epoch=1))
        bare = make_entry(1024)
        row: dict[str, float] = {"material_bytes": len(key.material)}
        for label, entry in (("without", bare), ("with", replace(bare, material=key.material))):
            blob = encode_entry(entry, keys=KEYS)
            t0 = time.perf_counter()
            for _ in range(repeat):
                encode_entry(entry, keys=KEYS)
            t1 = time.perf_counter()
            for _ in range(repeat):
                decode_entry(blob, keys=KEYS, material=False)
            t2 = time.perf_counter()
            row[f"{label}_bytes"] = len(blob)
            row[f"{label}_fill_us"] = (t1 - t0) / repeat * 1e6
            row[f"{label}_hit_us"] = (t2 - t1) / repeat * 1e6
        out[name] = row
    return out


async def throughput(op: Callable[[int], Awaitable[Any]], n: int, concurrency: int) -> float:
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await op(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


async def measure(url: str, size: int, ops: int, concurrency: int, rounds: int) -> dict[str, Any]:
    entry = make_entry(size)
    blob = encode_entry(entry, keys=KEYS)
    keys = [storage_key(scope=SCOPE, model="bench-model", epoch=1, digest=i.to_bytes(16, "big"))
            for i in range(256)]
    raw = Redis.from_url(url, socket_timeout=5, max_connections=concurrency + 4)
    store = open_store(url, socket_timeout=5.0, max_connections=concurrency + 4)

    paths: dict[str, tuple[Callable[[int], Awaitable[Any]], Callable[[int], Awaitable[Any]]]] = {
        "raw": (
            lambda i: raw.set(keys[i % 256], blob, px=3_600_000),
            lambda i: raw.get(keys[i % 256]),
        ),
        "store": (
            lambda i: store.set(keys[i % 256], blob, ttl=3600.0),
            lambda i: store.get(keys[i % 256]),
        ),
    }

    async def env_set(i: int) -> None:
        await store.set(keys[i % 256], encode_entry(entry, keys=KEYS), ttl=3600.0)

    async def env_get(i: int) -> Entry:
        got = await store.get(keys[i % 256])
        assert got is not None
        return decode_entry(got, keys=KEYS)

    paths["store+envelope"] = (env_set, env_get)
    for k in keys:
        await raw.set(k, blob)
    samples: dict[str, dict[str, list[float]]] = {
        p: {"set": [], "get": [], "ops": []} for p in paths
    }
    # Latencies: every iteration times each path once, in rotating order, so load from other
    # processes on a shared machine hits all paths alike. Throughput: rounds alternate paths.
    names = list(paths)
    clock = time.perf_counter
    for r in range(rounds):
        for i in range(ops):
            order = names[(i + r) % len(names):] + names[: (i + r) % len(names)]
            for kind, idx in (("set", 0), ("get", 1)):
                for name in order:
                    t0 = clock()
                    await paths[name][idx](i)
                    samples[name][kind].append(clock() - t0)
        for name, (set_op, get_op) in paths.items():

            async def mixed(i: int, s: Any = set_op, g: Any = get_op) -> Any:
                return await (s(i) if i % 5 == 0 else g(i))

            samples[name]["ops"].append(await throughput(mixed, ops, concurrency))
    await raw.aclose()
    await store.close()
    result: dict[str, Any] = {"bytes": len(blob)}
    for name, s in samples.items():
        result[name] = {
            "get_p50_us": pct(s["get"], 0.50) * 1e6, "get_p99_us": pct(s["get"], 0.99) * 1e6,
            "set_p50_us": pct(s["set"], 0.50) * 1e6, "set_p99_us": pct(s["set"], 0.99) * 1e6,
            "ops_per_s": statistics.median(s["ops"]),
        }
    return result


def ratios(res: dict[str, Any], path: str) -> dict[str, float]:
    r, s = res["raw"], res[path]
    return {
        "p50": (s["get_p50_us"] + s["set_p50_us"]) / (r["get_p50_us"] + r["set_p50_us"]),
        "p99": (s["get_p99_us"] + s["set_p99_us"]) / (r["get_p99_us"] + r["set_p99_us"]),
        "ops": s["ops_per_s"] / r["ops_per_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis", help="redis:// URL (default: a private redis-server)")
    ap.add_argument("--ops", type=int, default=2000, help="operations per path per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    server = None
    url = args.redis
    if url is None:
        server = start_private_redis("store")
        url = server.url
    try:
        results = {
            label: asyncio.run(measure(url, size, args.ops, args.concurrency, args.rounds))
            for label, size in (("1k", 1024), ("64k", 64 * 1024))
        }
    finally:
        if server is not None:
            server.kill()
    material = material_cost()
    out: dict[str, Any] = {"material": material}
    for label, res in results.items():
        for path, key in (("store", ""), ("store+envelope", "_envelope")):
            r = ratios(res, path)
            out[f"p50_ratio_{label}{key}"] = round(r["p50"], 3)
            out[f"p99_ratio_{label}{key}"] = round(r["p99"], 3)
            out[f"ops_ratio_{label}{key}"] = round(r["ops"], 3)
    out["detail"] = results
    if args.json:
        print(json.dumps(out))
        return
    print(f"response store vs raw redis-py ({args.ops} ops x {args.rounds} rounds per path, "
          f"concurrency {args.concurrency} for ops/s)")
    for label, res in results.items():
        print(f"\n{label} entries ({res['bytes']} bytes encoded)")
        print(f"{'path':<16}{'get p50':>10}{'get p99':>10}{'set p50':>10}{'set p99':>10}"
              f"{'ops/s':>10}   ratios p50 / p99 / ops")
        for path in ("raw", "store", "store+envelope"):
            m = res[path]
            line = (f"{path:<16}{m['get_p50_us']:>8.0f}us{m['get_p99_us']:>8.0f}us"
                    f"{m['set_p50_us']:>8.0f}us{m['set_p99_us']:>8.0f}us{m['ops_per_s']:>10.0f}")
            if path != "raw":
                r = ratios(res, path)
                line += f"   {r['p50']:.3f} / {r['p99']:.3f} / {r['ops']:.3f}"
            print(line)
    print("\ngoal: store adds under 15% over raw redis-py (p50 ratio < 1.15, ops ratio > 0.87)")
    print("\nkey material kept in entries (1 KB answer): stored bytes, fill encode, hit decode")
    print(f"{'request':<11}{'material':>10}{'entry':>9}{'+material':>11}"
          f"{'fill':>8}{'+material':>11}{'hit':>8}{'+material':>11}")
    for name, r in material.items():
        print(f"{name:<11}{r['material_bytes']:>9.0f}B{r['without_bytes']:>8.0f}B"
              f"{r['with_bytes']:>10.0f}B{r['without_fill_us']:>6.1f}us{r['with_fill_us']:>9.1f}us"
              f"{r['without_hit_us']:>6.1f}us{r['with_hit_us']:>9.1f}us")


if __name__ == "__main__":
    main()
