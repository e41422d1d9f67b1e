"""What the shadow auditor costs: hit throughput of the service with audit sampling at 0%, 1% and
10%, measured in one run.

One service process runs under uvicorn on loopback with the embedded store and the reference
engine (random-tiny) as upstream and as the auditor's oracle. Between rounds the benchmark
switches the sampling rate in place (a route the benchmark adds to its own app), so every rate
is measured in the same process, on the same warm caches:
every sampled hit is decoded again, checked for provenance, canaries and the registry, and
recomputed by the engine in the auditor's thread, which competes with the request path for the
CPU and the GIL. That is the cost being measured. At 0% the service has no observer at all.
N keep-alive clients in this process send hits (every request was filled beforehand); the rates
are measured in interleaved rounds so drift in the machine's load hits them alike.

Two figures per rate: hits per second (wall clock), and server CPU time per hit (from
``/proc``). The cost is the median, over rounds, of each rate's shortfall against the 0% run of
the same round.

    .venv/bin/python bench/audit.py [--seconds 2] [--rounds 9] [--clients 16] [--oracle engine|none] [--json]

Goal: 1% costs under 3% of hit throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import cpu_seconds, free_port, http_roundtrip, pct, wait_port  # noqa: E402

KEY = "sk-bench-tenant-0123456789"
ShadowConfigDefaults: Any = None
RATES = (0.0, 0.01, 0.10)


def body(i: int) -> bytes:
    return json.dumps({"model": "random-tiny", "temperature": 0, "max_tokens": 4,
                       "messages": [{"role": "user", "content": f"benchmark prompt number {i}"}]}
                      ).encode()


# -- the service (its own process) ---------------------------------------------------------


def serve(port: int, state: str, oracle: str) -> None:
    import logging

    import structlog
    import uvicorn

    from cachesvc.app import create_app
    from cachesvc.settings import load_settings
    from cachesvc.store import open_store
    from cachesvc.upstream import EngineUpstream
    from gpu_prefix.engine import Engine
    from gpu_prefix.models import load_model

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    settings = load_settings(
        None,
        state_dir=state,
        tenants=[{"id": "bench", "api_keys": [KEY], "canaries": ["CANARY-bench-1"]},
                 {"id": "other", "api_keys": ["sk-bench-other-0123456789"],
                  "canaries": ["CANARY-other-1"]}],
        upstream={"model": "random-tiny"},
        audit={"sample_rate": 0.01, "fill_sample_rate": 0.01, "oracle": oracle,
               "findings_path": str(Path(state) / "findings.jsonl"), "queue_size": 256},
        cache={"secret": "bench-secret-0123456789abcdef"},
        # A loop saturated by the benchmark lags; the default store timeout would turn hits
        # into (correct) misses and measure the breaker instead of the auditor.
        redis={"timeout_ms": 1000},
        logging={"level": "ERROR"},
    )
    engine = Engine(load_model("random-tiny"))
    app = create_app(settings, upstream=EngineUpstream(engine), store=open_store(None))
    observers: list[Any] = []

    @app.post("/_bench/rate/{rate}")
    async def set_rate(rate: float) -> dict[str, Any]:
        import dataclasses

        cache = app.state.services.cache
        if not observers:
            observers.extend(cache.observers)
        auditor = observers[0].auditor
        if rate == 0:
            cache.observers = ()
        else:
            auditor.config = dataclasses.replace(auditor.config, sample_rate=rate,
                                                 fill_sample_rate=rate)
            cache.observers = tuple(observers)
        return {"checked": auditor.checked, "dropped": auditor.dropped,
                "enqueued": auditor.enqueued, "findings": auditor.findings}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False,
                loop="uvloop", http="httptools")


# -- the per-event and per-sample costs, in this process ----------------------------------


def micro(hit_cpu_us: float) -> dict[str, Any]:
    """The request path's cost per event (the draw; for a sample, building and queueing the
    event) and the worker's cost per sample, measured
    directly; with the service's CPU per hit they give the expected cost of a sampling rate,
    a figure the load test's noise on a shared machine cannot hide."""
    import random as _random
    import timeit

    from audit import FileJournal, Recorder, ShadowAuditor, ShadowConfig
    from cachesvc.auditing import ShadowObserver, sample_from_event
    from cachesvc.events import CacheEvent
    from cachesvc.store import Entry, decode_entry, encode_entry
    from keying import KeyParams, Scope, build_key

    req = json.loads(body(1))
    key = build_key(req, KeyParams(scope=Scope.for_tenant("bench"), epoch=1, kind="chat"))
    raw = encode_entry(Entry(
        scope=key.scope, model=key.model, model_version="1", epoch=1, created_at=time.time(),
        ttl=600.0, digest=bytes(key.digest), material_digest=bytes(key.material_digest),
        response={"choices": [{"index": 0, "finish_reason": "length",
                               "message": {"role": "assistant", "content": "x" * 200}}]}))
    entry = decode_entry(raw)

    def make_event() -> CacheEvent:
        return CacheEvent(kind="hit", tenant="bench", scope=key.scope, request=req, key=key,
                          expected_model=key.model, expected_version="1", expected_epoch=1,
                          raw=raw, entry=entry, response=entry.response, at=time.time())

    event = make_event()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rate in (0.01, 0.10):
            auditor = ShadowAuditor(
                recorder=Recorder(FileJournal(Path(tmp) / "f.jsonl")), convert=sample_from_event,
                config=ShadowConfig(sample_rate=rate, queue_size=10**7),
                rng=_random.Random(0))
            obs = ShadowObserver(auditor)

            def on_hit(obs: ShadowObserver = obs) -> None:
                # What ResponseCache.notify does per hit: the draw, and for a sample only,
                # building the event and queueing it.
                if obs.wants("hit"):
                    obs.observe(make_event())

            n = 200_000
            out[f"observe_us_{rate:.2f}"] = 1e6 * timeit.timeit(on_hit, number=n) / n
        auditor = ShadowAuditor(recorder=Recorder(FileJournal(Path(tmp) / "g.jsonl")),
                                convert=sample_from_event, config=ShadowConfig(sample_rate=1.0))
        n = 2000
        out["check_us_no_oracle"] = 1e6 * timeit.timeit(
            lambda: auditor.check(sample_from_event(event)), number=n) / n
    out["hit_cpu_us"] = hit_cpu_us
    for rate in (0.01, 0.10):
        per_hit = out[f"observe_us_{rate:.2f}"] + rate * out["check_us_no_oracle"]
        out[f"expected_cost_pct_{rate:.2f}"] = 100 * per_hit / hit_cpu_us
    return out


# -- the load (this process) ---------------------------------------------------------------


def request(i: int) -> bytes:
    b = body(i)
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {KEY}"
            f"\r\nContent-Type: application/json\r\nContent-Length: {len(b)}\r\n\r\n").encode() + b


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    req: bytes) -> tuple[int, str]:
    status, headers, _ = await http_roundtrip(reader, writer, req)
    return status, headers.get("x-cache", "")


async def fill(port: int, prompts: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(prompts):
        status, _ = await roundtrip(reader, writer, request(i))
        if status != 200:
            raise RuntimeError(f"fill of prompt {i} answered {status}")
    writer.close()


async def load(port: int, pid: int, *, clients: int, seconds: float, prompts: int
               ) -> dict[str, Any]:
    reqs = [request(i) for i in range(prompts)]
    latencies: list[float] = []
    misses = 0
    stop = 0.0

    async def client(c: int) -> None:
        nonlocal misses
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = c
        while time.perf_counter() < stop:
            i = (i * 7919 + 13) % prompts
            t0 = time.perf_counter()
            status, xcache = await roundtrip(reader, writer, reqs[i])
            latencies.append(time.perf_counter() - t0)
            if status != 200 or not xcache.startswith("HIT"):
                misses += 1
        writer.close()

    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    stop = t0 + seconds
    await asyncio.gather(*(client(c) for c in range(clients)))
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    n = len(latencies)
    return {"hits_per_s": n / elapsed, "cpu_us_per_hit": 1e6 * cpu / n, "requests": n,
            "misses": misses, "p50_ms": 1000 * pct(latencies, 0.50),
            "p99_ms": 1000 * pct(latencies, 0.99)}


def findings_of(state: Path) -> int:
    total = 0
    for f in state.glob("findings*.jsonl"):
        total += sum(1 for line in f.read_text().splitlines() if line.strip())
    return total


async def set_rate(port: int, rate: float) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /_bench/rate/{rate} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n"
                 "Connection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


async def run(args: argparse.Namespace, port: int, pid: int) -> dict[str, Any]:
    await fill(port, args.prompts)
    results: dict[float, list[dict[str, Any]]] = {r: [] for r in RATES}
    stats: dict[str, Any] = {}
    for rnd in range(args.rounds):
        order = RATES if rnd % 2 == 0 else tuple(reversed(RATES))
        for rate in order:
            before = await set_rate(port, rate)
            res = await load(port, pid, clients=args.clients, seconds=args.seconds,
                             prompts=args.prompts)
            after = await set_rate(port, rate)
            res["audited"] = after["checked"] - before["checked"]
            res["dropped"] = after["dropped"] - before["dropped"]
            stats = after
            results[rate].append(res)
            if not args.json:
                print(f"round {rnd + 1} sampling {rate:>4.0%}: {res['hits_per_s']:7.0f} hits/s, "
                      f"{res['cpu_us_per_hit']:6.0f} us CPU/hit, p50 {res['p50_ms']:.2f} ms, "
                      f"p99 {res['p99_ms']:.2f} ms, audited {res['audited']}, dropped {res['dropped']}, "
                      f"misses {res['misses']}", flush=True)
    # NOTE: costs are medians of per-round ratios (each rate against the 0% run of the same
    # round, measured seconds apart), which cancels most of a shared machine's load drift.
    out: dict[str, Any] = {"oracle": args.oracle, "clients": args.clients,
                           "seconds": args.seconds, "rounds": args.rounds, "rates": {}}
    base = results[0.0]
    for rate in RATES:
        rs = results[rate]
        hps_ratio = statistics.median(r["hits_per_s"] / b["hits_per_s"] for r, b in zip(rs, base))
        cpu_ratio = statistics.median(r["cpu_us_per_hit"] / b["cpu_us_per_hit"]
                                      for r, b in zip(rs, base))
        out["rates"][f"{rate:.2f}"] = {
            "hits_per_s": statistics.median(r["hits_per_s"] for r in rs),
            "throughput_ratio": hps_ratio,
            "throughput_cost_pct": 100 * (1 - hps_ratio),
            "cpu_us_per_hit": statistics.median(r["cpu_us_per_hit"] for r in rs),
            "cpu_cost_pct": 100 * (cpu_ratio - 1),
            "p50_ms": statistics.median(r["p50_ms"] for r in rs),
            "p99_ms": statistics.median(r["p99_ms"] for r in rs),
            "misses": sum(r["misses"] for r in rs),
            "audited": sum(r["audited"] for r in rs),
            "dropped": sum(r["dropped"] for r in rs),
        }
    out["auditor"] = stats
    return out


def main() -> None:
    global ShadowConfigDefaults
    from audit import ShadowConfig

    ShadowConfigDefaults = ShadowConfig()
    if len(sys.argv) == 5 and sys.argv[1] == "--x-serve":
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=2.0, help="measured seconds per round")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds per rate")
    p.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients")
    p.add_argument("--prompts", type=int, default=200, help="distinct cached requests")
    p.add_argument("--oracle", choices=("engine", "none"), default="engine",
                   help="recompute sampled hits with the engine, or check provenance only")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            port = free_port()
            proc = subprocess.Popen([sys.executable, __file__, "--x-serve", str(port), tmp,
                                     args.oracle])
            procs.append(proc)
            wait_port(port, proc)
            summary = asyncio.run(run(args, port, proc.pid))
        finally:
            for proc in procs:
                proc.terminate()  # SIGTERM: the auditor drains and closes its journal
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        summary["findings"] = findings_of(Path(tmp))
        summary["oracle"] = args.oracle
    summary["micro"] = micro(summary["rates"]["0.00"]["cpu_us_per_hit"])
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"\n{'sampling':>9} {'hits/s':>8} {'vs 0%':>6} {'cost':>6} {'CPU us/hit':>11} "
          f"{'cost':>6} {'p50 ms':>7} {'p99 ms':>7} {'audited':>8} {'dropped':>8}")
    for rate, r in summary["rates"].items():
        print(f"{float(rate):>9.0%} {r['hits_per_s']:>8.0f} {r['throughput_ratio']:>6.3f} "
              f"{r['throughput_cost_pct']:>5.1f}% {r['cpu_us_per_hit']:>11.0f} "
              f"{r['cpu_cost_pct']:>5.1f}% {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
              f"{r['audited']:>8} {r['dropped']:>8}")
    one = summary["rates"]["0.01"]
    m = summary["micro"]
    print(f"\n1% sampling: {one['throughput_cost_pct']:.1f}% of hit throughput, "
          f"{one['cpu_cost_pct']:.1f}% more CPU per hit (goal: under 3%). "
          f"Findings on clean traffic: {summary['findings']}.")
    print(f"\nPer hit on the request path (draw, and for a sample build + queue the event): "
          f"{m['observe_us_0.01']:.2f} us at 1%, "
          f"{m['observe_us_0.10']:.2f} us at 10%; per sample in the worker (no recompute): "
          f"{m['check_us_no_oracle']:.0f} us; recompute capped at "
          f"{100 * ShadowConfigDefaults.recompute_budget:.0f}% of one core.")
    ten = summary["rates"]["0.10"]
    base = summary["rates"]["0.00"]
    per_sample = (ten["cpu_us_per_hit"] - base["cpu_us_per_hit"]) / 0.10
    print(f"In the service at 10%: {ten['cpu_us_per_hit'] - base['cpu_us_per_hit']:+.0f} us CPU per hit, "
          f"{per_sample:.0f} us per sample in place (the capped recompute included).")
    print(f"Against {m['hit_cpu_us']:.0f} us of service CPU per hit: expected cost "
          f"{m['expected_cost_pct_0.01']:.2f}% at 1%, {m['expected_cost_pct_0.10']:.2f}% at 10%, "
          f"plus the recompute budget.")


if __name__ == "__main__":
    main()
