"""Benchmark: cache hits through the service against the floor of its own stack.

In one run, with N concurrent keep-alive clients on loopback, under each HTTP server named by
``--servers`` (uvicorn with uvloop and httptools, the service's own; granian, installed with
``pip install '.[serve-bench]'``):

* ``service proxy``  - ``POST /v1/chat/completions`` answered from the cache (X-Cache: HIT);
* ``service lookup`` - ``POST /v1/cache/lookup`` answered with a hit;
* ``floor``          - a minimal FastAPI endpoint that reads the request body and does one
  redis-py GET of the very same stored bytes (the naive hit: nothing verified);
* ``bare floor``     - the same without FastAPI: a bare ASGI callable, body, one GET, with its
  start-up heap frozen out of the garbage collector as the service's is (cachesvc/heap.py): the
  strictest floor, whose p99 has no full-collection pauses either;
* ``service proxy, 2 workers`` and ``floor, 2 workers`` - the proxy hit and the floor with
  ``--workers 2`` (first server only): the service's scaling, and the floor's own in the same run.

Every server runs in its own processes against one real ``redis-server`` started here; the
service runs with auditing sampling on (``[audit] sample_rate`` 0.01, provenance checks).
The load comes from wrk (C; ``apt-get install wrk``) where it is on PATH, else from this
script's asyncio client (``--generator``); every answer is checked (status, X-Cache).
Prints hits per second, p50/p99 latency, and the CPU each hit cost the server, the load
generator and redis-server, with the cores each used and what other processes on the machine
took meanwhile (/proc/stat): on a small machine the generator's and others' CPU is the
server's loss, and the scaling of two workers is bounded by it (the run prints that bound).
Ratios are against the floor under the same server. A hit verifies its entry (the MAC, then
the payload) once per distinct stored bytes; a repeat of the same bytes is remembered. So the
run also times that check on the stored entry, in this process: the MAC alone and the whole
decode, against a proxy hit's server CPU. Goals (issue 13): proxy and lookup hits at >= 0.9x
the floor's throughput with p99 <= 1.3x; two workers >= 1.7x one worker's throughput.

    .venv/bin/python bench/service.py [--clients 32] [--seconds 5] [--rounds 3]
                                      [--servers uvicorn,granian] [--generator auto|wrk|python]
                                      [--audit-sample-rate 0.01] [--no-workers2] [--json]

``--json`` prints one JSON object on the last line (``proxy_throughput_ratio``,
``proxy_p99_ratio``, ``lookup_throughput_ratio``, ``lookup_p99_ratio``, the same against the
bare floor (``proxy_vs_bare_floor_p99_ratio``...), ``workers2_scaling``,
``floor_workers2_scaling``, ``workers2_scaling_vs_floor``, ``workers2_ceiling`` and
``workers2_ceiling_idle_machine`` (the same for the floor), ``cpu_us_per_hit`` per target,
every target's row under ``targets``, and the ratios per server under ``servers``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Self

from fastapi import FastAPI, Request, Response

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    cpu_seconds,
    free_port,
    http_roundtrip,
    pct,
    start_private_redis,
    tree_cpu_seconds,
    wait_port,
)

KEY = "sk-bench-tenant-0123456789abcdef"
SECRET = b"bench-secret-0123456789abcdef"
FLOOR_KEY = "bench:floor:entry"
BODY = (b'{"model":"echo-1","messages":[{"role":"system","content":"You are terse."},'
        b'{"role":"user","content":"Name three primes and say why each is prime."}],'
        b'"temperature":0,"max_tokens":64}')
SERVERS = ("uvicorn", "granian")
_REDIS_ENV = "BENCH_SERVICE_REDIS_URL"
_STATE_ENV = "BENCH_SERVICE_STATE_DIR"
_AUDIT_ENV = "BENCH_SERVICE_AUDIT_SAMPLE_RATE"


# -- the apps (factories: every server imports them by name, in each worker) ------------------


def service_app() -> Any:
    from cachesvc.app import create_app
    from cachesvc.logs import configure_logging
    from cachesvc.settings import load_settings
    from tests.support.echo_upstream import EchoUpstream

    # NOTE: timeout_ms=1000: a loop saturated by the benchmark itself lags past the 200 ms
    # default, and those lookups would (correctly) turn into misses and stop the run.
    settings = load_settings(None, state_dir=os.environ[_STATE_ENV],
                             redis={"url": os.environ[_REDIS_ENV], "timeout_ms": 1000},
                             tenants=[{"id": "bench", "api_keys": [KEY]}],
                             audit={"sample_rate": float(os.environ.get(_AUDIT_ENV, 0.01)),
                                    "fill_sample_rate": float(os.environ.get(_AUDIT_ENV, 0.01)),
                                    "oracle": "none"},
                             cache={"secret": SECRET.decode()})
    # As `cachesvc serve` does: JSON lines on stderr at the default level, so the access log
    # costs what it costs in service (the bench sends each server's output to a file).
    configure_logging(settings.logging.level, json=settings.logging.json_logs)
    return create_app(settings, upstream=EchoUpstream())


def floor_app() -> Any:
    from redis.asyncio import Redis

    client = Redis.from_url(os.environ[_REDIS_ENV])
    app = FastAPI()

    @app.post("/floor")
    async def floor(request: Request) -> Response:
        await request.body()
        raw = await client.get(FLOOR_KEY)
        return Response(raw, media_type="application/json")

    return app


def bare_floor_app() -> Any:
    from redis.asyncio import Redis

    from cachesvc import heap

    client = Redis.from_url(os.environ[_REDIS_ENV])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    heap.freeze()  # as the service does: no full GC pass walks start-up
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        raw = await client.get(FLOOR_KEY)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    return app


def serve(server: str, app: str, port: int, workers: int) -> None:
    """Run ``bench.service:<app>`` under ``server`` (this process is the server's parent)."""
    target = f"bench.service:{app}"
    if server == "uvicorn":
        import uvicorn

        http: Any = "httptools"
        if app == "service_app":
            from cachesvc.http_protocol import http_protocol
            from cachesvc.settings import LimitSettings

            # The protocol `cachesvc serve` runs: httptools with header and body timeouts.
            limits = LimitSettings()
            http = http_protocol(header_timeout_s=limits.header_timeout_s,
                                 body_timeout_s=limits.body_timeout_s)
        uvicorn.run(target, factory=True, host="127.0.0.1", port=port, workers=workers,
                    loop="uvloop", http=http, log_level="warning", access_log=False)
        return
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels
    from granian.server import Server

    Server(target, factory=True, address="127.0.0.1", port=port, workers=workers,
           interface=Interfaces.ASGI, loop=Loops.uvloop, log_level=LogLevels.warning).serve()


# -- load generator ---------------------------------------------------------------------------


def request_bytes(path: str, port: int, body: bytes, auth: bool) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n")
    if auth:
        head += f"Authorization: Bearer {KEY}\r\n"
    return head.encode() + b"\r\n" + body


@dataclass(frozen=True, kw_only=True, slots=True)
class Round:
    """One timed round against one target: rate, latency and who spent the CPU."""

    hits_per_s: float
    p50_ms: float
    p99_ms: float
    hits: int
    elapsed_s: float
    server_cpu_s: float
    generator_cpu_s: float
    redis_cpu_s: float
    #: CPU seconds of each worker process (a server with several workers), largest first.
    worker_cpu_s: tuple[float, ...]
    #: CPU seconds the whole machine spent (every process, ours and others', /proc/stat).
    machine_cpu_s: float


class Target(NamedTuple):
    port: int
    pid: int
    path: str
    body: bytes
    auth: bool
    want: str | None


def _machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores; Linux)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))
    return busy / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _workers_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each worker below a server's parent process (the parent alone when it
    has no worker processes); a worker's own children count as its own."""
    kids = [k for k in _children(pid) if not _is_helper(k)]
    if not kids:
        return {pid: tree_cpu_seconds(pid)}
    return {k: tree_cpu_seconds(k) for k in kids}


def _is_helper(pid: int) -> bool:
    # multiprocessing's resource tracker (spawned next to uvicorn's workers) is not a worker.
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


class Meter:
    """Reads the CPU that the server, the load generator and redis-server spent in a round."""

    def __init__(self, target: Target, redis_pid: int | None) -> None:
        self.target, self.redis_pid = target, redis_pid

    def __enter__(self) -> Self:
        self.t0 = time.perf_counter()
        self.server0 = tree_cpu_seconds(self.target.pid)
        self.workers0 = _workers_cpu(self.target.pid)
        self.redis0 = cpu_seconds(self.redis_pid)
        self.self0 = time.process_time()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.children0 = ru.ru_utime + ru.ru_stime
        self.machine0 = _machine_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
        self.server = tree_cpu_seconds(self.target.pid) - self.server0
        workers = _workers_cpu(self.target.pid)
        self.workers = tuple(sorted((workers[k] - self.workers0.get(k, 0.0) for k in workers),
                                    reverse=True))
        self.redis = cpu_seconds(self.redis_pid) - self.redis0
        self.machine = _machine_cpu_seconds() - self.machine0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        # This process (the Python generator) plus the children it reaped (wrk).
        self.generator = (time.process_time() - self.self0
                          + ru.ru_utime + ru.ru_stime - self.children0)


def load(target: Target, clients: int, seconds: float, generator: str,
         redis_pid: int | None) -> Round:
    """Drive ``target`` with ``clients`` keep-alive connections for ``seconds``."""
    run = _load_wrk if generator == "wrk" else _load_python
    with Meter(target, redis_pid) as meter:
        hits, p50, p99 = run(target, clients, seconds)
    return Round(hits_per_s=hits / meter.elapsed, p50_ms=p50, p99_ms=p99, hits=hits,
                 elapsed_s=meter.elapsed, server_cpu_s=meter.server,
                 generator_cpu_s=meter.generator, redis_cpu_s=meter.redis,
                 worker_cpu_s=meter.workers, machine_cpu_s=meter.machine)


# NOTE: wrk (C, one event-loop thread) drives the load where it is installed: the Python
# client costs more CPU per request than a hit does, and on a 2-core machine the generator's
# CPU is taken from the server's. The Lua hooks check every answer (status and X-Cache).
_WRK_LUA = r"""
local f = assert(io.open(os.getenv("BENCH_WRK_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_WRK_AUTH")
if auth ~= "" then wrk.headers["Authorization"] = auth end
local want = os.getenv("BENCH_WRK_WANT")
local threads = {}
function setup(thread) table.insert(threads, thread) end
bad, first = 0, nil
function response(status, headers, body)
  if status ~= 200 or (want ~= "" and (headers["x-cache"] or headers["X-Cache"]) ~= want) then
    bad = bad + 1
    if first == nil then first = status .. " " .. tostring(headers["x-cache"]) end
  end
end
function done(summary, latency, requests)
  local nbad, why = 0, ""
  for _, t in ipairs(threads) do
    nbad = nbad + t:get("bad")
    if t:get("first") ~= nil then why = t:get("first") end
  end
  local e = summary.errors
  io.write(string.format(
    "BENCH {\"requests\": %d, \"p50_us\": %d, \"p99_us\": %d, \"bad\": %d, " ..
    "\"errors\": %d, \"first_bad\": \"%s\"}\n",
    summary.requests, latency:percentile(50), latency:percentile(99), nbad,
    e.connect + e.read + e.write + e.status + e.timeout, why))
end
"""


def _load_wrk(target: Target, clients: int, seconds: float) -> tuple[int, float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script, body = Path(tmp, "hit.lua"), Path(tmp, "body.json")
        script.write_text(_WRK_LUA)
        body.write_bytes(target.body)
        env = {**os.environ, "BENCH_WRK_BODY": str(body), "BENCH_WRK_WANT": target.want or "",
               "BENCH_WRK_AUTH": f"Bearer {KEY}" if target.auth else ""}
        out = subprocess.run(
            ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
             "-s", str(script), f"http://127.0.0.1:{target.port}{target.path}"],
            env=env, capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("BENCH "))
    res = json.loads(line[len("BENCH "):])
    if res["bad"] or res["errors"]:
        raise SystemExit(f"{res['bad']} answers were not 200 {target.want or ''} (first: "
                         f"{res['first_bad']}), {res['errors']} socket errors: the benchmark is "
                         f"invalid\n{out}")
    return int(res["requests"]), res["p50_us"] / 1000, res["p99_us"] / 1000


def _load_python(target: Target, clients: int, seconds: float) -> tuple[int, float, float]:
    latencies = asyncio.run(_python_clients(target, clients, seconds))
    return len(latencies), pct(latencies, 0.50) * 1000, pct(latencies, 0.99) * 1000


async def _python_clients(target: Target, clients: int, seconds: float) -> list[float]:
    req = request_bytes(target.path, target.port, target.body, target.auth)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    bad = 0

    async def client() -> None:
        nonlocal bad
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                status, headers, body = await http_roundtrip(reader, writer, req)
                latencies.append(time.perf_counter() - t0)
                if status != 200 or (target.want is not None
                                     and headers.get("x-cache") != target.want):
                    bad += 1
                    if bad == 1:
                        print(f"unexpected answer: {status} {headers.get('x-cache')} "
                              f"{headers.get('x-cache-reason')} {body[:200]!r}", file=sys.stderr)
        finally:
            writer.close()

    await asyncio.gather(*[client() for _ in range(clients)])
    if bad:
        raise SystemExit(f"{bad} responses were not 200 {target.want or ''}: the benchmark is "
                         "invalid")
    return latencies


# -- orchestration ----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per target")
    ap.add_argument("--servers", default=None,
                    help="comma-separated, from: " + ", ".join(SERVERS) + "; the service's "
                    "own server (uvicorn) first: its ratios are the headline. Default: both, "
                    "or uvicorn alone where granian is not installed")
    ap.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                    help="the load generator: wrk (C; apt-get install wrk) or this script's "
                    "asyncio client; auto: wrk where it is on PATH")
    ap.add_argument("--audit-sample-rate", type=float, default=0.01,
                    help="the service's [audit] sample_rate and fill_sample_rate (the goal's 1%%)")
    ap.add_argument("--no-workers2", action="store_true",
                    help="skip the --workers 2 targets")
    ap.add_argument("--json", action="store_true",
                    help="also print one JSON object on the last line")
    args = ap.parse_args()
    servers = args.servers.split(",") if args.servers else ["uvicorn"] + (
        ["granian"] if importlib.util.find_spec("granian") else [])
    if not servers or any(s not in SERVERS for s in servers):
        ap.error(f"--servers: choose from {', '.join(SERVERS)}")
    if args.generator == "auto":
        args.generator = "wrk" if shutil.which("wrk") else "python"
    elif args.generator == "wrk" and not shutil.which("wrk"):
        ap.error("--generator wrk: wrk is not on PATH (apt-get install wrk)")

    redis_server = start_private_redis("service")
    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    env = {**os.environ, _REDIS_ENV: redis_server.url, _STATE_ENV: str(tmp),
           _AUDIT_ENV: str(args.audit_sample_rate),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # (app, server, workers) -> port
    plan = [(app, srv, 1) for srv in servers
            for app in ("floor_app", "bare_floor_app", "service_app")]
    if not args.no_workers2:
        plan += [("service_app", servers[0], 2), ("floor_app", servers[0], 2)]
    ports: dict[tuple[str, str, int], int] = {}
    pids: dict[int, int] = {}
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        for app, srv, workers in plan:
            port = ports[(app, srv, workers)] = free_port()
            logs.append(tmp / f"{app}-{srv}-{workers}.log")
            with logs[-1].open("wb") as out:
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--x-serve", srv, app, str(port), str(workers)],
                    env=env, stdout=out, stderr=subprocess.STDOUT))
            pids[port] = procs[-1].pid
        for port, proc in zip(ports.values(), procs, strict=True):
            wait_port(port, proc)
        for port in ports.values():
            wait_settled(pids[port])
        _run(args, servers, redis_server, ports, pids)
    except BaseException:
        for log in logs:  # the servers' own words (their output goes to files)
            tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
            if tail:
                print(f"--- {log.name} (last lines)", *tail, sep="\n", file=sys.stderr)
        raise
    finally:
        for p in reversed(procs):  # the servers; Redis after them
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        redis_server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def wait_settled(pid: int, timeout: float = 300.0) -> None:
    """Return once the server below ``pid`` is idle (under 5% of a core for a second).

    NOTE: a server with workers listens (in its parent) before each worker has imported the
    app; on a loaded machine that takes tens of seconds, and a round run meanwhile would
    count a worker's start-up as CPU per hit, and its connections would wait for it.
    """
    deadline = time.monotonic() + timeout
    before = tree_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = tree_cpu_seconds(pid)
        if now - before < 0.05:
            return
        before = now
    raise RuntimeError(f"the server {pid} is still busy after {timeout}s")


async def _fill(first: int, rport: int) -> bytes:
    """Fill one entry through the service, then give the floors the very same stored bytes."""
    from redis.asyncio import Redis

    reader, writer = await asyncio.open_connection("127.0.0.1", first)
    proxy_first = request_bytes("/v1/chat/completions", first, BODY, auth=True)
    states = [(await http_roundtrip(reader, writer, proxy_first))[1].get("x-cache")
              for _ in range(2)]
    writer.close()
    if states != ["MISS", "HIT"]:
        raise SystemExit(f"warm-up expected MISS then HIT, got {states}")
    r = Redis.from_url(f"redis://127.0.0.1:{rport}/0")
    keys = [k async for k in r.scan_iter(match="llmc:v1:*")]
    if len(keys) != 1:
        raise SystemExit(f"expected one stored entry, found {len(keys)}")
    raw = await r.get(keys[0])
    assert isinstance(raw, bytes)
    await r.set(FLOOR_KEY, raw)
    await r.aclose()
    return raw


def _run(args: argparse.Namespace, servers: list[str], redis_server: Any,
         ports: dict[tuple[str, str, int], int], pids: dict[int, int]) -> None:
    raw = asyncio.run(_fill(ports[("service_app", servers[0], 1)], redis_server.port))
    lookup_body = b'{"request":' + BODY + b"}"
    targets: dict[str, Target] = {}
    for (app, srv, workers), port in ports.items():
        named = f", {workers} workers" if workers > 1 else ""
        if app == "floor_app":
            targets[f"floor{named} [{srv}]"] = Target(port, pids[port], "/floor", BODY, False,
                                                      None)
        elif app == "bare_floor_app":
            targets[f"bare floor [{srv}]"] = Target(port, pids[port], "/floor", BODY, False,
                                                    None)
        elif workers == 1:
            targets[f"service proxy hit [{srv}]"] = Target(
                port, pids[port], "/v1/chat/completions", BODY, True, "HIT")
            targets[f"service lookup hit [{srv}]"] = Target(
                port, pids[port], "/v1/cache/lookup", lookup_body, True, None)
        else:
            targets[f"service proxy hit{named} [{srv}]"] = Target(
                port, pids[port], "/v1/chat/completions", BODY, True, "HIT")
    for target in targets.values():  # warm connections, pools and memos
        load(target, 4, 1.0, args.generator, redis_server.pid)
    rounds: dict[str, list[Round]] = {name: [] for name in targets}
    # NOTE: each pair compared for the scaling runs back to back (others' load on the machine
    # drifts over a run), then the rest; the table keeps the plan's order.
    pairs = [f"{what}{n} [{servers[0]}]" for what in ("floor", "service proxy hit")
             for n in ("", ", 2 workers")]
    order = [n for n in pairs if n in targets] + [n for n in targets if n not in pairs]
    for _ in range(args.rounds):
        for name in order:
            rounds[name].append(load(targets[name], args.clients, args.seconds,
                                     args.generator, redis_server.pid))

    ncpu = os.cpu_count() or 1
    print(f"\n{args.clients} concurrent clients ({args.generator}), {args.rounds} x "
          f"{args.seconds:.0f} s per target, entry {len(raw)} bytes, loopback, one worker each "
          f"unless named; CPU in us per hit, cores = CPU s per wall s (of {ncpu})\n")
    print(f"{'target':38} {'hits/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'server':>7} "
          f"{'gen':>5} {'redis':>5} {'server':>7} {'bench':>5} {'other':>5}  workers' cores")
    print(f"{'':38} {'':>7} {'':>7} {'':>7} {'us/hit':>7} {'us':>5} {'us':>5} {'cores':>7} "
          f"{'cores':>5} {'cores':>5}")
    table: dict[str, dict[str, Any]] = {}
    med = statistics.median
    for name, runs in rounds.items():

        def per_hit(field: str, runs: list[Round] = runs) -> float:
            return float(med(getattr(r, field) / max(1, r.hits) for r in runs)) * 1e6

        row = table[name] = {
            "hits_per_s": med(r.hits_per_s for r in runs),
            "p50_ms": med(r.p50_ms for r in runs),
            "p99_ms": med(r.p99_ms for r in runs),
            "cpu_us_per_hit": per_hit("server_cpu_s"),
            "generator_cpu_us_per_hit": per_hit("generator_cpu_s"),
            "redis_cpu_us_per_hit": per_hit("redis_cpu_s"),
            "server_cores": med(r.server_cpu_s / r.elapsed_s for r in runs),
            "bench_cores": med((r.server_cpu_s + r.generator_cpu_s + r.redis_cpu_s)
                               / r.elapsed_s for r in runs),
            # What the rest of the machine took meanwhile (other users' load).
            "other_cores": med(max(0.0, r.machine_cpu_s - r.server_cpu_s - r.generator_cpu_s
                                   - r.redis_cpu_s) / r.elapsed_s for r in runs),
            "runs_hits_per_s": [r.hits_per_s for r in runs],
        }
        split = ""
        if len(runs[0].worker_cpu_s) > 1:
            shares = [med(r.worker_cpu_s[i] / r.elapsed_s for r in runs)
                      for i in range(len(runs[0].worker_cpu_s))]
            row["worker_cores"] = shares
            split = " / ".join(f"{c:.2f}" for c in shares)
        print(f"{name:38} {row['hits_per_s']:7.0f} {row['p50_ms']:7.2f} {row['p99_ms']:7.2f} "
              f"{row['cpu_us_per_hit']:7.0f} {row['generator_cpu_us_per_hit']:5.0f} "
              f"{row['redis_cpu_us_per_hit']:5.0f} {row['server_cores']:7.2f} "
              f"{row['bench_cores']:5.2f} {row['other_cores']:5.2f}  {split}")
    out: dict[str, Any] = {"clients": args.clients, "seconds": args.seconds,
                           "audit_sample_rate": args.audit_sample_rate, "rounds": args.rounds,
                           "entry_bytes": len(raw), "cpu_count": ncpu,
                           "generator": args.generator, "server": servers[0], "servers": {}}
    print()
    for srv in servers:
        floor, bare = table[f"floor [{srv}]"], table[f"bare floor [{srv}]"]
        ratios = out["servers"][srv] = {}
        for what in ("proxy", "lookup"):
            row = table[f"service {what} hit [{srv}]"]
            ratios[f"{what}_throughput_ratio"] = row["hits_per_s"] / floor["hits_per_s"]
            ratios[f"{what}_p99_ratio"] = row["p99_ms"] / floor["p99_ms"]
            ratios[f"{what}_vs_bare_floor_throughput_ratio"] = (
                row["hits_per_s"] / bare["hits_per_s"])
            ratios[f"{what}_vs_bare_floor_p99_ratio"] = row["p99_ms"] / bare["p99_ms"]
            print(f"[{srv}] {what} hit: throughput {ratios[f'{what}_throughput_ratio']:5.2f}x "
                  f"floor (goal >= 0.90), p99 {ratios[f'{what}_p99_ratio']:5.2f}x floor "
                  f"(goal <= 1.30); against the bare-ASGI floor: throughput "
                  f"{ratios[f'{what}_vs_bare_floor_throughput_ratio']:5.2f}x, p99 "
                  f"{ratios[f'{what}_vs_bare_floor_p99_ratio']:5.2f}x")
    out.update(out["servers"][servers[0]])
    srv = servers[0]
    two = table.get(f"service proxy hit, 2 workers [{srv}]")
    if two is not None:
        _report_workers2(out, table, srv, ncpu)
    out["cpu_us_per_hit"] = {name: row["cpu_us_per_hit"] for name, row in table.items()}
    out["targets"] = table
    mac_us, decode_us = _entry_check_us(raw)
    hit_us = table[f"service proxy hit [{servers[0]}]"]["cpu_us_per_hit"]
    out["entry_mac_us"], out["entry_decode_us"] = mac_us, decode_us
    print(f"\nentry check of a hit on bytes not seen before ({len(raw)} B): MAC {mac_us:.2f} us,"
          f" whole decode {decode_us:.2f} us; the MAC is {mac_us / hit_us:.1%} of a proxy hit's "
          f"server CPU ({hit_us:.0f} us)")
    print(f"\ncpu count {ncpu}; the load generator and redis-server run on the same machine; "
          "figures are for this machine and its load")
    if args.json:
        print(json.dumps(out, sort_keys=True))


def _report_workers2(out: dict[str, Any], table: dict[str, dict[str, Any]], srv: str,
                     ncpu: int) -> None:
    """Two workers against one, for the service and for the floor, and what the machine had.

    NOTE: the generator and redis-server share the machine with the server, and so may other
    users. ``<x>_ceiling`` is the most the two-worker rate could be over the one-worker rate on
    this machine during the run: the cores not taken by other processes, divided by the CPU a
    hit cost with two workers (server, generator and redis together), over one worker's rate.
    ``<x>_ceiling_idle_machine`` is the same with no other load and one worker at its best
    (one full core): ``ncpu`` x one worker's CPU per hit / two workers' CPU per hit, all in.
    ``<x>_server_cores_available`` is what two workers could have used at most: the cores left
    after the generator, redis and other processes.
    """
    one, two = table[f"service proxy hit [{srv}]"], table[f"service proxy hit, 2 workers [{srv}]"]
    f1, f2 = table[f"floor [{srv}]"], table[f"floor, 2 workers [{srv}]"]
    out["workers2_scaling"] = two["hits_per_s"] / one["hits_per_s"]
    out["floor_workers2_scaling"] = f2["hits_per_s"] / f1["hits_per_s"]
    out["workers2_scaling_vs_floor"] = out["workers2_scaling"] / out["floor_workers2_scaling"]
    for key, row1, row2 in (("workers2", one, two), ("floor_workers2", f1, f2)):
        per_hit = (row2["cpu_us_per_hit"] + row2["generator_cpu_us_per_hit"]
                   + row2["redis_cpu_us_per_hit"]) / 1e6
        free = ncpu - row2["other_cores"]
        out[f"{key}_ceiling"] = free / per_hit / row1["hits_per_s"]
        # On this machine with nothing else running: one worker is one core at most.
        out[f"{key}_ceiling_idle_machine"] = ncpu * row1["cpu_us_per_hit"] / 1e6 / per_hit
        out[f"{key}_server_cpu_per_hit_ratio"] = row2["cpu_us_per_hit"] / row1["cpu_us_per_hit"]
        out[f"{key}_server_cores_available"] = free - (
            row2["generator_cpu_us_per_hit"] + row2["redis_cpu_us_per_hit"]) / 1e6 \
            * row2["hits_per_s"]
        out[f"{key}_server_cores_used"] = row2["server_cores"]
    print(f"[{srv}] 2 workers: {out['workers2_scaling']:5.2f}x one worker's proxy hit "
          f"throughput (goal >= 1.70); the floor's own: {out['floor_workers2_scaling']:5.2f}x; "
          f"the service's over the floor's: {out['workers2_scaling_vs_floor']:5.2f}")
    print(f"[{srv}] 2 workers' server CPU per hit over one worker's: service "
          f"{out['workers2_server_cpu_per_hit_ratio']:.2f}, floor "
          f"{out['floor_workers2_server_cpu_per_hit_ratio']:.2f}. Cores the 2 workers used / "
          f"could have used (left by the generator, redis and other load): service "
          f"{out['workers2_server_cores_used']:.2f} / {out['workers2_server_cores_available']:.2f}"
          f", floor {out['floor_workers2_server_cores_used']:.2f} / "
          f"{out['floor_workers2_server_cores_available']:.2f}")
    print(f"[{srv}] the machine's ceiling for that scaling at the CPU per hit measured: service "
          f"{out['workers2_ceiling']:.2f}x, floor {out['floor_workers2_ceiling']:.2f}x; with "
          f"no other load ({ncpu} cores, one worker at most one core): service "
          f"{out['workers2_ceiling_idle_machine']:.2f}x, floor "
          f"{out['floor_workers2_ceiling_idle_machine']:.2f}x")


def _entry_check_us(raw: bytes) -> tuple[float, float]:
    """Microseconds to verify ``raw``'s MAC, and to decode it whole (MAC, msgpack, checks): what
    a hit pays once per distinct stored bytes (repeats of the same bytes are remembered)."""
    import timeit

    from cachesvc.store import EntryKeys, decode_entry
    from cachesvc.store.envelope import HEADER_SIZE

    keys = EntryKeys(SECRET)
    signed, tag, payload = raw[:HEADER_SIZE - 32], raw[HEADER_SIZE - 32:HEADER_SIZE], \
        raw[HEADER_SIZE:]
    kid = signed[5:]
    n = 20_000
    best = [min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6 for fn in (
        lambda: keys.verify(kid, tag, signed, payload),
        lambda: decode_entry(raw, keys=keys, material=False))]
    return best[0], best[1]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--x-serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
