"""Benchmark: what the LiteLLM adapter adds to a LiteLLM cache hit, against LiteLLM's own Redis
cache hit, measured in the same run.

    make bench-gateway          # = .venv-bench/bin/python bench/gateway.py [--calls N] [--rounds R]

One private ``redis-server`` backs both caches. ``litellm-redis`` is ``litellm.Cache(type=
"redis")`` in the calling process; ``cachesvc`` is ``ProvableCache`` talking over loopback HTTP
to the service (``tests/gateway/stack.py --production``: uvicorn with uvloop and httptools, 1%
of hits audited, the same Redis), which keys, scopes and verifies every hit. LiteLLM's async
path puts an in-process memory cache in front of its Redis cache (``DualCache``), so its
``acompletion`` hits are memory hits: LiteLLM's own behaviour, measured as it is.
``lookup only`` is the same hit through ``cachesvc.client`` without LiteLLM (the service's
share of the adapter's cost). ``model`` is a LiteLLM call with no cache to the echo model on
loopback (a floor for what a hit saves; a real model takes far longer). Each round times
``--calls`` sequential hits per cache through ``litellm.completion`` and
``litellm.acompletion``, the caches interleaved; every timed call is checked to be a hit.
Prints p50 and p99 per round, and the adapter's overhead (its p50 minus LiteLLM-Redis's) with
its spread over the rounds.

Runs in LiteLLM's virtualenv (``make .venv-bench/.installed``); the service runs in ``.venv``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import litellm  # noqa: E402
from litellm.caching.caching import Cache  # noqa: E402

from bench._common import pct, start_private_redis  # noqa: E402
from cachesvc.client import CacheClient  # noqa: E402
from cachesvc.integrations.litellm import ProvableCache, openai_request  # noqa: E402
from tests.gateway.harness import running_stack  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant for an online shop. " * 8},
    {"role": "user", "content": "Where is my order 4711? It was due on Monday."},
]


#: Untimed pause after each call. LiteLLM logs every call afterwards (a task on the loop, or a
#: thread), several ms of work that would otherwise land inside whichever next call waits on
#: I/O, i.e. inside the adapter's HTTP round trip but not inside an in-memory hit.
GAP_S = 0.02


def time_sync(call: Callable[[], Any], calls: int, expect: Callable[[Any], bool]) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        r = call()
        out.append(time.perf_counter() - t0)
        _check(expect(r))
        time.sleep(GAP_S)
    return out


def time_async(call: Callable[[], Awaitable[Any]], calls: int,
               expect: Callable[[Any], bool]) -> list[float]:
    async def run() -> list[float]:
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            r = await call()
            out.append(time.perf_counter() - t0)
            _check(expect(r))
            await asyncio.sleep(GAP_S)
        return out

    return asyncio.run(run())


def _check(ok: bool) -> None:
    if not ok:
        sys.exit("a timed call was not what it should be (a hit, or for `model` no cache): "
                 "the benchmark is void")


def is_hit(response: Any) -> bool:
    return bool(response._hidden_params.get("cache_hit"))


def fill(cache: Any, kwargs: dict[str, Any]) -> None:
    """One miss to fill, then wait until the entry answers (fills run after the call)."""
    litellm.cache = cache
    litellm.completion(**kwargs)
    deadline = time.monotonic() + 10
    while not is_hit(litellm.completion(**kwargs)):
        if time.monotonic() > deadline:
            sys.exit(f"{type(cache).__name__} never stored the answer")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200, help="timed hits per cache per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    redis = start_private_redis("gateway")
    try:
        with running_stack("--redis", redis.url, "--production") as stack:
            kwargs = {"model": "openai/echo-1", "messages": MESSAGES, "temperature": 0,
                      "max_tokens": 64, "api_base": stack.upstream, "api_key": "sk-upstream"}
            caches: dict[str, Any] = {
                "litellm-redis": Cache(type="redis", host=redis.host, port=str(redis.port)),
                "cachesvc": ProvableCache(stack.service, stack.key_a),
            }
            for cache in caches.values():
                fill(cache, kwargs)
            with CacheClient(stack.service, stack.key_a) as client:
                report(caches, client, kwargs, args.calls, args.rounds)
    finally:
        litellm.cache = None
        redis.kill()


def report(caches: dict[str, Any], client: CacheClient, kwargs: dict[str, Any], calls: int,
           rounds: int) -> None:
    print(f"LiteLLM {version('litellm')}, {calls} sequential calls per cache per round, "
          f"{rounds} rounds; latency in ms")
    body = openai_request(kwargs)
    # NOTE: the adapter's own async client for the running loop, so `lookup only` uses the very
    # connection pool the adapter uses.
    adapter: ProvableCache = caches["cachesvc"]
    modes = {
        "completion": (time_sync, lambda: litellm.completion(**kwargs),
                       lambda: client.lookup(body, kind="chat")),
        "acompletion": (time_async, lambda: litellm.acompletion(**kwargs),
                        lambda: adapter._aclient().lookup(body, kind="chat")),
    }
    for mode, (timed, completion, lookup) in modes.items():
        overhead: list[tuple[float, float]] = []  # (ms, ratio) per round
        print(f"\n{mode}:")
        print(f"  {'round':>5} {'cache':>14} {'p50':>8} {'p99':>8}")
        for r in range(1, rounds + 1):
            p50: dict[str, float] = {}
            runs: list[tuple[str, Any, Callable[[], Any], Callable[[Any], bool]]] = [
                *((name, cache, completion, is_hit) for name, cache in caches.items()),
                ("lookup only", None, lookup, lambda found: found.hit),
                ("model (none)", None, completion, lambda resp: not is_hit(resp))]
            for name, cache, call, expect in runs:
                litellm.cache = cache
                timed(call, 20, expect)  # warm this path's connections after the others ran
                lat = timed(call, calls if name != "model (none)" else max(20, calls // 5),
                            expect)
                p50[name] = pct(lat, 0.5) * 1e3
                print(f"  {r:>5} {name:>14} {p50[name]:8.3f} {pct(lat, 0.99) * 1e3:8.3f}")
            overhead.append((p50["cachesvc"] - p50["litellm-redis"],
                             p50["cachesvc"] / p50["litellm-redis"]))
        ms, ratio = zip(*overhead, strict=True)
        print(f"  adapter overhead on a hit, p50 cachesvc - p50 litellm-redis: median "
              f"{statistics.median(ms):.3f} ms (rounds {min(ms):.3f}..{max(ms):.3f}); "
              f"ratio {statistics.median(ratio):.2f}x ({min(ratio):.2f}..{max(ratio):.2f})")


if __name__ == "__main__":
    main()
