"""Benchmark: cache hits through the service against the floor of its own stack.

In one run, with N concurrent keep-alive clients on loopback, under each HTTP server named by
``--servers`` (uvicorn with uvloop and httptools, the service's own; granian, installed with
``pip install '.[serve-bench]'``):

* ``service proxy``  - ``POST /v1/chat/completions`` answered from the cache (X-Cache: HIT);
* ``service lookup`` - ``POST /v1/cache/lookup`` answered with a hit;
* ``floor``          - a minimal FastAPI endpoint that reads the request body and does one
  redis-py GET of the very same stored bytes (the naive hit: nothing verified);
* ``bare floor``     - the same without FastAPI: a bare ASGI callable, body, one GET;
* ``service proxy, 2 workers`` - the proxy hit with ``--workers 2`` (first server only).

Every server runs in its own processes against one real ``redis-server`` started here; the
service runs with auditing sampling on (``[audit] sample_rate`` 0.01, provenance checks).
Prints hits per second, p50/p99 latency and server CPU per hit for each target, and the ratios
against the floor under the same server. A hit verifies its entry (the MAC, then the payload)
once per distinct stored bytes; a repeat of the same bytes is remembered. So the run also times
that check on the stored entry, in this process: the MAC alone and the whole decode, against a
proxy hit's server CPU. Goals (issue 13): proxy and lookup hits at >= 0.9x the floor's
throughput with p99 <= 1.3x; two workers >= 1.7x one worker's throughput.

    .venv/bin/python bench/service.py [--clients 32] [--seconds 5] [--rounds 3]
                                      [--servers uvicorn,granian] [--no-workers2] [--json]

``--json`` prints one JSON object on the last line (``proxy_throughput_ratio``,
``proxy_p99_ratio``, ``lookup_throughput_ratio``, ``lookup_p99_ratio``, ``workers2_scaling``,
``cpu_us_per_hit`` per target, and the same per server under ``servers``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
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


# -- the apps (factories: every server imports them by name, in each worker) ------------------


def service_app() -> Any:
    from cachesvc.app import create_app
    from cachesvc.settings import load_settings
    from tests.support.echo_upstream import EchoUpstream

    # NOTE: timeout_ms=1000: a loop saturated by the benchmark itself lags past the 200 ms
    # default, and those lookups would (correctly) turn into misses and stop the run.
    settings = load_settings(None, state_dir=os.environ[_STATE_ENV],
                             redis={"url": os.environ[_REDIS_ENV], "timeout_ms": 1000},
                             tenants=[{"id": "bench", "api_keys": [KEY]}],
                             audit={"sample_rate": 0.01, "fill_sample_rate": 0.01,
                                    "oracle": "none"},
                             cache={"secret": SECRET.decode()},
                             logging={"level": "WARNING"})
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

    client = Redis.from_url(os.environ[_REDIS_ENV])

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
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


CPU_PER_REQUEST: dict[int, list[float]] = {}
PIDS: dict[int, int] = {}


async def load(port: int, req: bytes, clients: int, seconds: float, want: str | None
               ) -> tuple[float, list[float]]:
    pid = PIDS.get(port)
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    bad = 0

    async def client() -> None:
        nonlocal bad
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                status, headers, _ = await http_roundtrip(reader, writer, req)
                latencies.append(time.perf_counter() - t0)
                if status != 200 or (want is not None and headers.get("x-cache") != want):
                    bad += 1
                    if bad == 1:
                        print(f"unexpected answer: {status} {headers.get('x-cache')} "
                              f"{headers.get('x-cache-reason')} {_[:200]!r}", file=sys.stderr)
        finally:
            writer.close()

    t0 = time.perf_counter()
    cpu0 = tree_cpu_seconds(pid)
    await asyncio.gather(*[client() for _ in range(clients)])
    elapsed = time.perf_counter() - t0
    CPU_PER_REQUEST.setdefault(port, []).append(
        (tree_cpu_seconds(pid) - cpu0) / max(1, len(latencies)))
    if bad:
        raise SystemExit(f"{bad} responses were not 200 {want or ''}: the benchmark is invalid")
    return len(latencies) / elapsed, latencies


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
    ap.add_argument("--no-workers2", action="store_true",
                    help="skip the --workers 2 target")
    ap.add_argument("--json", action="store_true",
                    help="also print one JSON object on the last line")
    args = ap.parse_args()
    servers = args.servers.split(",") if args.servers else ["uvicorn"] + (
        ["granian"] if importlib.util.find_spec("granian") else [])
    if not servers or any(s not in SERVERS for s in servers):
        ap.error(f"--servers: choose from {', '.join(SERVERS)}")

    redis_server = start_private_redis("service")
    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    env = {**os.environ, _REDIS_ENV: redis_server.url, _STATE_ENV: str(tmp),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # (app, server, workers) -> port
    plan = [(app, srv, 1) for srv in servers
            for app in ("floor_app", "bare_floor_app", "service_app")]
    if not args.no_workers2:
        plan.append(("service_app", servers[0], 2))
    ports: dict[tuple[str, str, int], int] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for app, srv, workers in plan:
            port = ports[(app, srv, workers)] = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--x-serve", srv, app, str(port), str(workers)],
                env=env))
            PIDS[port] = procs[-1].pid
        for (_, _, _), port in ports.items():
            wait_port(port)
        asyncio.run(_run(args, servers, redis_server.port, ports))
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


async def _run(args: argparse.Namespace, servers: list[str], rport: int,
               ports: dict[tuple[str, str, int], int]) -> None:
    from redis.asyncio import Redis

    first = ports[("service_app", servers[0], 1)]
    # Fill one entry through the service, then give the floors the very same stored bytes.
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
    await r.set(FLOOR_KEY, raw)
    await r.aclose()

    targets: dict[str, tuple[int, bytes, str | None]] = {}
    for (app, srv, workers), port in ports.items():
        if app == "floor_app":
            targets[f"floor [{srv}]"] = (port, request_bytes("/floor", port, BODY, False), None)
        elif app == "bare_floor_app":
            targets[f"bare floor [{srv}]"] = (port, request_bytes("/floor", port, BODY, False),
                                              None)
        elif workers == 1:
            targets[f"service proxy hit [{srv}]"] = (
                port, request_bytes("/v1/chat/completions", port, BODY, True), "HIT")
            targets[f"service lookup hit [{srv}]"] = (
                port, request_bytes("/v1/cache/lookup", port, b'{"request":' + BODY + b"}",
                                    True), None)
        else:
            targets[f"service proxy hit, 2 workers [{srv}]"] = (
                port, request_bytes("/v1/chat/completions", port, BODY, True), "HIT")
    for port, req, want in targets.values():  # warm connections, pools and memos
        await load(port, req, 4, 0.5, want)
    CPU_PER_REQUEST.clear()
    results: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in targets}
    cpu: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(args.rounds):
        for name, (port, req, want) in targets.items():
            results[name].append(await load(port, req, args.clients, args.seconds, want))
            cpu[name].append(CPU_PER_REQUEST[port][-1])

    print(f"\n{args.clients} concurrent clients, {args.rounds} x {args.seconds:.0f} s per "
          f"target, entry {len(raw)} bytes, loopback, one worker each unless named\n")
    print(f"{'target':42} {'hits/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU us/hit':>18}")
    table: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        lat = sorted(x for _, lats in runs for x in lats)
        row = table[name] = {"hits_per_s": statistics.median(r for r, _ in runs),
                             "p50_ms": pct(lat, 0.50) * 1000, "p99_ms": pct(lat, 0.99) * 1000,
                             "cpu_us_per_hit": statistics.median(cpu[name]) * 1e6}
        print(f"{name:42} {row['hits_per_s']:9.0f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
              f"{row['cpu_us_per_hit']:18.0f}")
    out: dict[str, Any] = {"clients": args.clients, "seconds": args.seconds,
                           "rounds": args.rounds, "entry_bytes": len(raw),
                           "cpu_count": os.cpu_count(), "server": servers[0], "servers": {}}
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
            print(f"[{srv}] {what} hit: throughput {ratios[f'{what}_throughput_ratio']:5.2f}x "
                  f"floor (goal >= 0.90), p99 {ratios[f'{what}_p99_ratio']:5.2f}x floor "
                  f"(goal <= 1.30); {ratios[f'{what}_vs_bare_floor_throughput_ratio']:5.2f}x "
                  "the bare-ASGI floor")
    out.update(out["servers"][servers[0]])
    two = table.get(f"service proxy hit, 2 workers [{servers[0]}]")
    if two is not None:
        one = table[f"service proxy hit [{servers[0]}]"]
        out["workers2_scaling"] = two["hits_per_s"] / one["hits_per_s"]
        print(f"[{servers[0]}] 2 workers: {out['workers2_scaling']:5.2f}x one worker's proxy hit "
              "throughput (goal >= 1.70)")
    out["cpu_us_per_hit"] = {name: row["cpu_us_per_hit"] for name, row in table.items()}
    out["targets"] = table
    mac_us, decode_us = _entry_check_us(raw)
    hit_us = table[f"service proxy hit [{servers[0]}]"]["cpu_us_per_hit"]
    out["entry_mac_us"], out["entry_decode_us"] = mac_us, decode_us
    print(f"\nentry check of a hit on bytes not seen before ({len(raw)} B): MAC {mac_us:.2f} us,"
          f" whole decode {decode_us:.2f} us; the MAC is {mac_us / hit_us:.1%} of a proxy hit's "
          f"server CPU ({hit_us:.0f} us)")
    print(f"\ncpu count {os.cpu_count()}; figures are for this machine and its load")
    if args.json:
        print(json.dumps(out, sort_keys=True))


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
