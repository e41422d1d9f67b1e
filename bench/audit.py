"""What the shadow auditor costs: hit throughput of the service with audit sampling at 0%, 1% and
10%, measured in one run.

Each service process runs under uvicorn on loopback with the embedded store and the reference
engine (random-tiny) as upstream and as the auditor's oracle. The benchmark switches a
service's sampling rate in place between runs (a route it adds to its own app): every sampled
hit is decoded again, checked for provenance, canaries and the registry, and recomputed by the
engine in the auditor's thread, which competes with the request path for the CPU and the GIL.
That is the cost being measured. At 0% the service has no observer at all. Keep-alive clients
in this process send hits (every request was filled beforehand).

Where the machine has two or more cores the services are pinned to one core (torch to one
thread) and the load generator to the others, as a gateway's clients are on other machines
(``--no-pin`` to share all cores).

``--mode paired`` (the default): two twin services share that core and are loaded at once.
In each run one samples at the rate under test and the other is at 0%; they take turns. The
cost is the sampling twin's shortfall in hits per CPU-second (its capacity on a core of its
own), averaged over both twins' turns; "0% again" runs both at 0% (the A/A control). Each twin
has half a core, so it gets half the recompute budget. ``--mode sequential``: one service, the
rates one after another, each against the mean of its round's 0% runs; on a machine whose
speed drifts from second to second this cannot resolve a few percent.

The cost is reported as a mean with a 95% confidence interval (Student's t), beside the
worker thread's own CPU share, the event loop's extra CPU per hit (paired), and the request
path's cost per hit timed in a tight loop (``micro``).

    .venv/bin/python bench/audit.py [--mode paired|sequential] [--rounds 20] [--seconds 1]
        [--rates 0,1,10] [--oracle engine|none] [--set NAME=VALUE] [--no-pin] [--json]

Goal: 1% costs under 3% of hit throughput. The verdict is "met" when the interval's upper
bound is under 3%, "missed" when its lower bound is over, and "not resolved" otherwise.
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

from bench._common import free_port, http_roundtrip, pct, wait_port  # noqa: E402

KEY = "sk-bench-tenant-0123456789"

def parse_runs(rates: str) -> list[tuple[str, float]]:
    """(label, sampling rate) of each run in a round: the 0% baseline, then ``rates`` (percent;
    0 is the A/A control, a second 0% run)."""
    runs = [("0%", 0.0)]
    for part in rates.split(","):
        pct_ = float(part)
        if not 0 <= pct_ <= 100:
            raise SystemExit(f"--rates: {part!r} is not a percentage from 0 to 100")
        runs.append(("0% again", 0.0) if pct_ == 0 else (f"{pct_:g}%", pct_ / 100))
    return runs

GOAL_PCT = 3.0


def body(i: int) -> bytes:
    return json.dumps({"model": "random-tiny", "temperature": 0, "max_tokens": 4,
                       "messages": [{"role": "user", "content": f"benchmark prompt number {i}"}]}
                      ).encode()


# -- the service (its own process) ---------------------------------------------------------


def serve(port: int, state: str, oracle: str, cpus: str, audit: dict[str, Any]) -> None:
    import logging
    import os

    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    import structlog
    import torch
    import uvicorn

    if cpus:
        torch.set_num_threads(len(cpus.split(",")))

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
        audit={**audit, "sample_rate": 0.01, "fill_sample_rate": 0.01, "oracle": oracle,
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
    first = [True]

    @app.post("/_bench/rate/{rate}")
    async def set_rate(rate: float) -> dict[str, Any]:
        import dataclasses

        cache = app.state.services.cache
        if not observers:
            observers.extend(cache.observers)
        auditor = observers[0].auditor
        # What the last rate queued is checked now, not during the next rate's run.
        await asyncio.to_thread(auditor.drain)
        # NOTE: the recompute bucket runs only while sampling, and starts empty. In steady
        # state 1% sampling asks for more recompute than the budget allows, so the bucket is
        # empty; credit banked during the 0% runs (or the initial burst) would be spent in the
        # 1% and 10% runs and inflate their cost.
        budget = auditor.checker.budget
        if first[0]:
            budget.drain(now=time.monotonic())  # the auditor's timer
            first[0] = False
        elif not cache.observers:
            budget.skip_to(time.monotonic())
        if rate == 0:
            cache.observers = ()
        else:
            auditor.config = dataclasses.replace(auditor.config, sample_rate=rate,
                                                 fill_sample_rate=rate)
            cache.observers = tuple(observers)
        # This handler runs on the event loop: thread_time() is the loop's own CPU.
        return {"cpu_s": time.process_time(), "loop_cpu_s": time.thread_time(),
                "checked": auditor.checked, "dropped": auditor.dropped,
                "enqueued": auditor.enqueued, "findings": auditor.findings,
                "worker_cpu_s": auditor.worker_cpu_s,
                "recompute_skipped": auditor.recompute_skipped}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False,
                loop="uvloop", http="httptools")


# -- the per-event and per-sample costs, in this process ----------------------------------


def micro(hit_cpu_us: float) -> dict[str, Any]:
    """The request path's cost per hit (``ResponseCache.notify`` with the auditor's observer)
    and the worker's cost per sample, measured directly, in a tight loop: in the service the
    same code runs with cold caches and costs several times more (see the README)."""
    import functools
    import random as _random
    import timeit

    from audit import FileJournal, Recorder, ShadowAuditor, ShadowConfig
    from cachesvc.auditing import EntryReader, ShadowObserver
    from cachesvc.events import CacheEvent
    from cachesvc.response_cache import Keyed, Payload, ResponseCache
    from cachesvc.store import Entry, EntryKeys, decode_entry, encode_entry
    from cachesvc.tenants import Tenant
    from keying import KeyParams, Scope, build_key

    keys = EntryKeys(b"bench-secret-0123456789abcdef")
    sample_from_event = EntryReader(keys=keys, max_entry_bytes=1 << 22,
                                    max_ttl_s=86_400.0).sample
    req = json.loads(body(1))
    key = build_key(req, KeyParams(scope=Scope.for_tenant("bench"), epoch=1, kind="chat"))
    raw = encode_entry(Entry(
        scope=key.scope, model=key.model, model_version="1", epoch=1, created_at=time.time(),
        ttl=600.0, digest=bytes(key.digest), material_digest=bytes(key.material_digest),
        response={"choices": [{"index": 0, "finish_reason": "length",
                               "message": {"role": "assistant", "content": "x" * 200}}]}),
        keys=keys)
    entry = decode_entry(raw, keys=keys)

    def make_event() -> CacheEvent:
        return CacheEvent(kind="hit", tenant="bench", scope=key.scope, request=req, key=key,
                          expected_model=key.model, expected_version="1", expected_epoch=1,
                          raw=raw, entry=entry, response=entry.response, at=time.time())

    event = make_event()
    tenant = Tenant(id="bench", scope_kind="tenant", cache_nondeterministic=False,
                    ttl_seconds=600, canaries=())
    keyed = Keyed(tenant=tenant, scope=key.scope, body=req, kind="chat", key=key, version="1",
                  epoch=1, stream=False, include_usage=False)
    payload = Payload(stream=False, body=entry.response)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rate in (0.01, 0.10):
            auditor = ShadowAuditor(
                recorder=Recorder(FileJournal(Path(tmp) / "f.jsonl")), convert=sample_from_event,
                config=ShadowConfig(sample_rate=rate, queue_size=10**7),
                rng=_random.Random(0))
            # The service's own per-hit call: the countdown, and for the events it does not
            # skip the draw; for a sample, building the event and queueing it.
            cache = ResponseCache(store=None, guard=None, versions=None, secret=b"bench",
                                  keys=keys, observers=(ShadowObserver(auditor),))
            on_hit = functools.partial(cache.notify, "hit", keyed, raw, entry, payload)
            n = 200_000
            out[f"observe_us_{rate:.2f}"] = 1e6 * timeit.timeit(on_hit, number=n) / n
        auditor = ShadowAuditor(recorder=Recorder(FileJournal(Path(tmp) / "g.jsonl")),
                                convert=sample_from_event, config=ShadowConfig(sample_rate=1.0))
        n = 2000
        out["check_us_no_oracle"] = 1e6 * timeit.timeit(
            lambda: auditor.check(sample_from_event(event)), number=n) / n
    out["hit_cpu_us"] = hit_cpu_us
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


class Clients:
    """N keep-alive connections, opened once and reused by every run."""

    def __init__(self, port: int, n: int, prompts: int) -> None:
        self.port, self.n, self.prompts = port, n, prompts
        self.reqs = [request(i) for i in range(prompts)]
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.cursor = list(range(n))

    async def open(self) -> None:
        self.conns = [await asyncio.open_connection("127.0.0.1", self.port)
                      for _ in range(self.n)]

    def close(self) -> None:
        for _, writer in self.conns:
            writer.close()

    async def load(self, seconds: float) -> dict[str, Any]:
        latencies: list[float] = []
        misses = 0
        stop = time.perf_counter() + seconds

        async def client(c: int) -> None:
            nonlocal misses
            reader, writer = self.conns[c]
            i = self.cursor[c]
            while time.perf_counter() < stop:
                i = (i * 7919 + 13) % self.prompts
                t0 = time.perf_counter()
                status, xcache = await roundtrip(reader, writer, self.reqs[i])
                latencies.append(time.perf_counter() - t0)
                if status != 200 or not xcache.startswith("HIT"):
                    misses += 1
            self.cursor[c] = i

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(self.n)))
        elapsed = time.perf_counter() - t0
        n = len(latencies)
        return {"hits_per_s": n / elapsed, "requests": n, "misses": misses,
                "p50_ms": 1000 * pct(latencies, 0.50), "p99_ms": 1000 * pct(latencies, 0.99)}


def findings_of(state: Path) -> int:
    total = 0
    for f in state.rglob("findings*.jsonl"):
        total += sum(1 for line in f.read_text().splitlines() if line.strip())
    return total


async def set_rate(port: int, rate: float) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /_bench/rate/{rate} HTTP/1.1\r\nHost: bench\r\nContent-Length: 0\r\n"
                 "Connection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def interval(values: list[float], twins: list[int] | None = None) -> tuple[float, float, float]:
    """Mean and the 95% confidence interval of the mean (Student's t). With ``twins`` (which
    twin sampled in each run), the mean of the two twins' means: a constant difference between
    the twins themselves cancels out instead of widening or shifting the figure."""
    from scipy import stats

    if twins is None or len(set(twins)) < 2:
        mean = statistics.fmean(values)
        if len(values) < 2:
            return mean, float("-inf"), float("inf")
        half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
        return mean, mean - half, mean + half
    groups = [[v for v, t in zip(values, twins, strict=False) if t == twin] for twin in (0, 1)]
    if min(len(g) for g in groups) < 2:
        return interval(values)
    mean = sum(statistics.fmean(g) for g in groups) / 2
    se = sum(statistics.variance(g) / len(g) for g in groups) ** 0.5 / 2
    half = stats.t.ppf(0.975, len(values) - 2) * se
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    if high < GOAL_PCT:
        return "met"
    if low > GOAL_PCT:
        return "missed"
    return "not resolved (run more rounds)"


def window(before: dict[str, Any], after: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """One measured run: the load's figures plus what the server says it spent meanwhile."""
    cpu = after["cpu_s"] - before["cpu_s"]
    hits = max(1, res["requests"])
    res["cpu_us_per_hit"] = 1e6 * cpu / hits
    res["audited"] = after["checked"] - before["checked"]
    res["dropped"] = after["dropped"] - before["dropped"]
    res["worker_cpu_share_pct"] = 100 * (after["worker_cpu_s"] - before["worker_cpu_s"]) / cpu
    res["loop_cpu_us_per_hit"] = 1e6 * (after["loop_cpu_s"] - before["loop_cpu_s"]) / hits
    return res


def show(label: str, rnd: int, res: dict[str, Any]) -> None:
    print(f"round {rnd + 1} sampling {label:>8}: {res['hits_per_s']:7.0f} hits/s, "
          f"{res['cpu_us_per_hit']:6.0f} us CPU/hit, worker {res['worker_cpu_share_pct']:4.1f}% "
          f"of CPU, p99 {res['p99_ms']:.2f} ms, audited {res['audited']}, "
          f"dropped {res['dropped']}, misses {res['misses']}", flush=True)


def summarise(rate: float, rs: list[dict[str, Any]], costs: list[float],
              cpu_costs: list[float] | None = None, twins: list[int] | None = None
              ) -> dict[str, Any]:
    """A rate's figures. ``cpu_costs``: the CPU per hit's rise, where it is a measure of its
    own (sequential); paired, the cost is already the CPU per hit's."""
    mean, low, high = interval(costs, twins)
    out = {
        "rate": rate,
        "hits_per_s": statistics.median(r["hits_per_s"] for r in rs),
        "throughput_cost_pct": mean, "throughput_cost_ci95": [low, high],
        "throughput_cost_median_pct": statistics.median(costs),
        "cpu_us_per_hit": statistics.median(r["cpu_us_per_hit"] for r in rs),
        "loop_cpu_us_per_hit": statistics.median(r["loop_cpu_us_per_hit"] for r in rs),
        "worker_cpu_share_pct": statistics.fmean(r["worker_cpu_share_pct"] for r in rs),
        "p50_ms": statistics.median(r["p50_ms"] for r in rs),
        "p99_ms": statistics.median(r["p99_ms"] for r in rs),
        "misses": sum(r["misses"] for r in rs),
        "audited": sum(r["audited"] for r in rs),
        "dropped": sum(r["dropped"] for r in rs),
    }
    if cpu_costs is not None:
        cpu_mean, cpu_low, cpu_high = interval(cpu_costs, twins)
        out["cpu_cost_pct"], out["cpu_cost_ci95"] = cpu_mean, [cpu_low, cpu_high]
    return out


async def run_sequential(args: argparse.Namespace, ports: list[int]) -> dict[str, Any]:
    """One service; each round runs every rate once, in a shuffled order."""
    import random

    port = ports[0]
    await fill(port, args.prompts)
    clients = Clients(port, args.clients, args.prompts)
    await clients.open()
    order_rng = random.Random(args.seed)
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in args.runs}
    for rnd in range(args.rounds):
        order = list(args.runs)
        order_rng.shuffle(order)
        for label, rate in order:
            before = await set_rate(port, rate)
            res = await clients.load(args.seconds)
            res = window(before, await set_rate(port, rate), res)
            results[label].append(res)
            if not args.json:
                show(label, rnd, res)
    clients.close()
    # NOTE: each rate is compared with the mean of the two 0% runs of its own round, measured
    # seconds apart, which cancels most of a shared machine's load drift; the A/A control
    # ("0% again" against "0%") shows the noise floor that is left.
    rates: dict[str, Any] = {}
    a = results["0%"]
    b = results.get("0% again", a)  # without the control, the one 0% run is the baseline
    base = [(x["hits_per_s"] + y["hits_per_s"]) / 2 for x, y in zip(a, b, strict=False)]
    base_cpu = [(x["cpu_us_per_hit"] + y["cpu_us_per_hit"]) / 2 for x, y in zip(a, b, strict=False)]
    for label, rate in args.runs:
        rs = results[label]
        if label == "0% again":
            costs = [100 * (1 - y["hits_per_s"] / x["hits_per_s"])
                     for x, y in zip(a, b, strict=False)]
            cpu_costs = [100 * (y["cpu_us_per_hit"] / x["cpu_us_per_hit"] - 1)
                         for x, y in zip(a, b, strict=False)]
        else:
            costs = [100 * (1 - r["hits_per_s"] / h) for r, h in zip(rs, base, strict=False)]
            cpu_costs = [100 * (r["cpu_us_per_hit"] / c - 1)
                         for r, c in zip(rs, base_cpu, strict=False)]
        rates[label] = summarise(rate, rs, costs, cpu_costs)
    return rates


async def run_paired(args: argparse.Namespace, ports: list[int]) -> dict[str, Any]:
    """Two identical services on the same core, loaded at once: in each run one samples at
    the rate under test and the other at 0% (the twins take turns), so both see the same
    machine at the same instant. The cost is the sampled one's shortfall in hits per
    CPU-second (its capacity on a core of its own) against its twin's, averaged over the two
    twins' turns."""
    import random

    for port in ports:
        await fill(port, args.prompts)
    clients = [Clients(port, args.clients, args.prompts) for port in ports]
    for c in clients:
        await c.open()
    rng = random.Random(args.seed)
    tests = [(label, rate) for label, rate in args.runs if label != "0%"]
    first = {label: rng.randrange(2) for label, _ in tests}
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in args.runs}
    costs: dict[str, list[float]] = {label: [] for label, _ in tests}
    raw: dict[str, list[float]] = {label: [] for label, _ in tests}
    twins: dict[str, list[int]] = {label: [] for label, _ in tests}
    loop: dict[str, list[float]] = {label: [] for label, _ in tests}
    for rnd in range(args.rounds):
        order = list(tests)
        rng.shuffle(order)
        for label, rate in order:
            # The twins take turns sampling at each rate, so each does half the runs.
            t = (len(twins[label]) + first[label]) % 2
            twins[label].append(t)
            rate_of = [rate if i == t else 0.0 for i in range(2)]
            before = [await set_rate(ports[i], rate_of[i]) for i in range(2)]
            loads = await asyncio.gather(*(c.load(args.seconds) for c in clients))
            res = [window(before[i], await set_rate(ports[i], rate_of[i]), loads[i])
                   for i in range(2)]
            test, control = res[t], res[1 - t]
            results[label].append(test)
            results["0%"].append(control)
            costs[label].append(100 * (1 - control["cpu_us_per_hit"] / test["cpu_us_per_hit"]))
            raw[label].append(100 * (1 - test["hits_per_s"] / control["hits_per_s"]))
            # The event loop's own CPU per hit against the twin's, as a share of the twin's
            # whole CPU per hit: the request path's part of the cost, indirect effects included.
            loop[label].append(100 * (test["loop_cpu_us_per_hit"] - control["loop_cpu_us_per_hit"])
                               / control["cpu_us_per_hit"])
            if not args.json:
                show(label, rnd, test)
                show("0%", rnd, control)
    for c in clients:
        c.close()
    rates: dict[str, Any] = {"0%": summarise(0.0, results["0%"], [0.0, 0.0])}
    for label, rate in tests:
        rates[label] = summarise(rate, results[label], costs[label], twins=twins[label])
        mean, low, high = interval(loop[label], twins[label])
        rates[label]["loop_cost_pct"] = mean
        rates[label]["loop_cost_ci95"] = [low, high]
        mean, low, high = interval(raw[label], twins[label])
        rates[label]["raw_throughput_cost_pct"] = mean
        rates[label]["raw_throughput_cost_ci95"] = [low, high]
    return rates


def split_cores(pin: bool) -> tuple[str, set[int] | None]:
    """The service's core (as the ``--x-serve`` argument) and the load generator's cores; no
    pinning where asked not to, or where fewer than two cores are ours."""
    import os

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(cores) < 2:
        return "", None
    return str(cores[0]), set(cores[1:])


def report(summary: dict[str, Any]) -> None:
    from audit import ShadowConfig

    rates = summary["rates"]
    print(f"\n{'sampling':>9} {'hits/s':>8} {'throughput cost (95% CI)':>26} {'median':>7} "
          f"{'CPU us/hit':>11} {'worker CPU':>10} {'p99 ms':>7} {'audited':>8} {'dropped':>8}")
    for label, r in rates.items():
        low, high = r["throughput_cost_ci95"]
        cost = ("-" if label == "0%"
                else f"{r['throughput_cost_pct']:5.1f}% ({low:5.1f}..{high:4.1f})")
        print(f"{label:>9} {r['hits_per_s']:>8.0f} {cost:>26} "
              f"{r['throughput_cost_median_pct']:>6.1f}% {r['cpu_us_per_hit']:>11.0f} "
              f"{r['worker_cpu_share_pct']:>9.2f}% {r['p99_ms']:>7.2f} {r['audited']:>8} "
              f"{r['dropped']:>8}")
    if summary["mode"] == "paired":
        print("(paired: each cost is the shortfall in hits per CPU-second against a twin service "
              "at 0% on the same core in the same seconds; '0% again' is the A/A control, both "
              "twins at 0%)")
        for label, r in rates.items():
            if label != "0%":
                low, high = r["raw_throughput_cost_ci95"]
                l_low, l_high = r["loop_cost_ci95"]
                print(f"  {label:>8}: hits/s while sharing the core "
                      f"{r['raw_throughput_cost_pct']:.1f}% below the twin "
                      f"({low:.1f}..{high:.1f}); "
                      f"the event loop's own CPU per hit {r['loop_cost_pct']:+.1f}% "
                      f"({l_low:.1f}..{l_high:.1f}) of a hit")
    else:
        print("(costs against the mean of the same round's 0% runs; '0% again' is the A/A "
              "control: its row is the second 0% run against the first)")
    budget = summary["audit_settings"].get("recompute_budget", ShadowConfig().recompute_budget)
    paired = summary["mode"] == "paired"
    half_core = " (half the default: each twin has half a core)" if paired else ""
    print(f"Findings on clean traffic: {summary['findings']}. Recompute capped at "
          f"{100 * budget:g}% of one core's wall time per service"
          f"{half_core}; "
          f"[audit] settings given: {summary['audit_settings'] or 'none'}.")
    m = summary["micro"]
    print(f"Per hit on the request path (ResponseCache.notify, in a tight loop): "
          f"{m['observe_us_0.01']:.2f} us at 1%, {m['observe_us_0.10']:.2f} us at 10%, against "
          f"{m['hit_cpu_us']:.0f} us of service CPU per hit; per sample in the worker (no "
          f"recompute): {m['check_us_no_oracle']:.0f} us.")
    one = rates.get("1%")
    if one is not None:
        low, high = one["throughput_cost_ci95"]
        direct = one["worker_cpu_share_pct"] + 100 * m["observe_us_0.01"] / m["hit_cpu_us"]
        print(f"\n1% sampling costs {one['throughput_cost_pct']:.1f}% of hit throughput "
              f"(95% CI {low:.1f}..{high:.1f}%, {summary['mode']}, {summary['rounds']} rounds "
              f"of {summary['seconds']:g} s, "
              f"{'pinned cores' if summary['pinned'] else 'shared cores'}); goal under "
              f"{GOAL_PCT:g}%: {verdict(low, high)}. Of that, the worker thread's own CPU is "
              f"{one['worker_cpu_share_pct']:.2f}% and the request path's (notify, in a tight "
              "loop) "
              f"{direct - one['worker_cpu_share_pct']:.2f}%.")


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--x-serve":
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], json.loads(sys.argv[6]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("paired", "sequential"), default="paired",
                   help="paired: two twin services on one core, loaded at once (the default); "
                        "sequential: one service, the rates one after another")
    p.add_argument("--seconds", type=float, default=1.0, help="measured seconds per run")
    p.add_argument("--rounds", type=int, default=20, help="rounds (each runs every rate once)")
    p.add_argument("--clients", type=int, default=16, help="keep-alive clients per service")
    p.add_argument("--prompts", type=int, default=200, help="distinct cached requests")
    p.add_argument("--oracle", choices=("engine", "none"), default="engine",
                   help="recompute sampled hits with the engine, or check provenance only")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="let the services and the load generator share every core")
    p.add_argument("--seed", type=int, default=0, help="seed of the rounds' shuffled order")
    p.add_argument("--set", dest="audit", action="append", default=[], metavar="NAME=VALUE",
                   help="an [audit] setting for the services, e.g. batch_wait_s=0.2 (repeatable)")
    p.add_argument("--rates", default="0,1,10",
                   help="the sampling rates under test, in percent (0 runs the A/A control)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    args.runs = parse_runs(args.rates)
    if args.mode == "paired" and not any(a.startswith("recompute_budget=") for a in args.audit):
        from audit import ShadowConfig

        # NOTE: the recompute budget is a share of one core, and each twin has half of one:
        # half the budget is the same share of a twin's CPU as the default is of a service's
        # own core (the default would cost a twin twice what it costs a service).
        args.audit.append(f"recompute_budget={ShadowConfig().recompute_budget / 2}")
    args.audit = {k: json.loads(v) for k, _, v in (a.partition("=") for a in args.audit)}
    server_cpus, client_cpus = split_cores(args.pin)
    args.pinned = client_cpus is not None
    if client_cpus is not None:
        import os

        os.sched_setaffinity(0, client_cpus)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ports = []
            for i in range(2 if args.mode == "paired" else 1):
                port = free_port()
                state = Path(tmp) / f"service-{i}"
                state.mkdir()
                procs.append(subprocess.Popen([sys.executable, __file__, "--x-serve", str(port),
                                               str(state), args.oracle, server_cpus,
                                               json.dumps(args.audit)]))
                ports.append(port)
            for port, proc in zip(ports, procs, strict=True):
                wait_port(port, proc)
            runner = run_paired if args.mode == "paired" else run_sequential
            rates = asyncio.run(runner(args, ports))
        finally:
            for proc in procs:
                proc.terminate()  # SIGTERM: the auditor drains and closes its journal
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        summary: dict[str, Any] = {
            "mode": args.mode, "oracle": args.oracle, "clients": args.clients,
            "seconds": args.seconds, "rounds": args.rounds, "pinned": args.pinned,
            "audit_settings": args.audit, "rates": rates, "findings": findings_of(Path(tmp))}
    summary["micro"] = micro(rates["0%"]["cpu_us_per_hit"])
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        report(summary)


if __name__ == "__main__":
    main()
