"""Benchmark: cache hits through the service against the floor of its own stack.

In one run, with N concurrent keep-alive clients on loopback:

* ``service proxy``  - ``POST /v1/chat/completions`` answered from the cache (X-Cache: HIT);
* ``service lookup`` - ``POST /v1/cache/lookup`` answered with a hit;
* ``floor``          - a minimal FastAPI endpoint under the same uvicorn (uvloop, httptools)
  that reads the request body and does one Redis GET of the very same stored bytes.

Both servers run in their own processes against one real ``redis-server`` started here; the
service runs with auditing sampling on (``[audit] sample_rate`` 0.01, provenance checks).
Prints hits per second and p50/p99 latency for each, and the ratios against the floor.
The goal: at least 0.8 of the floor's throughput, p99 within 1.5x.

A hit verifies its entry (the MAC, then the payload) once per distinct stored bytes; a repeat
of the same bytes is remembered. So the run also times that check on the stored entry, in this
process: the MAC alone and the whole decode, against a proxy hit's server CPU.

    .venv/bin/python bench/service.py [--clients 32] [--seconds 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastapi import FastAPI, Request, Response

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import (  # noqa: E402
    cpu_seconds,
    free_port,
    http_roundtrip,
    pct,
    start_private_redis,
    wait_port,
)

KEY = "sk-bench-tenant-0123456789abcdef"
SECRET = b"bench-secret-0123456789abcdef"
FLOOR_KEY = "bench:floor:entry"
BODY = (b'{"model":"echo-1","messages":[{"role":"system","content":"You are terse."},'
        b'{"role":"user","content":"Name three primes and say why each is prime."}],'
        b'"temperature":0,"max_tokens":64}')


# -- servers (each runs in its own process) -----------------------------------------------------


def serve_service(port: int, redis_url: str, state_dir: str) -> None:
    import uvicorn

    from cachesvc.app import create_app
    from cachesvc.echo_upstream import EchoUpstream
    from cachesvc.settings import load_settings

    # NOTE: timeout_ms=1000: a loop saturated by the benchmark itself lags past the 200 ms
    # default, and those lookups would (correctly) turn into misses and stop the run.
    settings = load_settings(None, state_dir=state_dir,
                             redis={"url": redis_url, "timeout_ms": 1000},
                             tenants=[{"id": "bench", "api_keys": [KEY]}],
                             audit={"sample_rate": 0.01, "fill_sample_rate": 0.01,
                                    "oracle": "none"},
                             cache={"secret": SECRET.decode()},
                             logging={"level": "WARNING"})
    from cachesvc.http_protocol import http_protocol

    # The protocol `cachesvc serve` runs (httptools with a header timeout).
    uvicorn.run(create_app(settings, upstream=EchoUpstream()), host="127.0.0.1", port=port,
                loop="uvloop", http=http_protocol(header_timeout_s=settings.limits.header_timeout_s,
                                    body_timeout_s=settings.limits.body_timeout_s),
                log_level="warning", access_log=False)


def serve_floor(port: int, redis_url: str) -> None:
    import uvicorn
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    app = FastAPI()

    @app.post("/floor")
    async def floor(request: Request) -> Response:
        await request.body()
        raw = await client.get(FLOOR_KEY)
        return Response(raw, media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False)


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
                status, headers, _ = await http_roundtrip(reader, writer, req)  # noqa: F841
                latencies.append(time.perf_counter() - t0)
                if status != 200 or (want is not None and headers.get("x-cache") != want):
                    bad += 1
                    if bad == 1:
                        print(f"unexpected answer: {status} {headers.get('x-cache')} "
                              f"{headers.get('x-cache-reason')} {_[:200]!r}", file=sys.stderr)
        finally:
            writer.close()

    t0 = time.perf_counter()
    cpu0 = cpu_seconds(pid)
    await asyncio.gather(*[client() for _ in range(clients)])
    elapsed = time.perf_counter() - t0
    CPU_PER_REQUEST.setdefault(port, []).append((cpu_seconds(pid) - cpu0) / max(1, len(latencies)))
    if bad:
        raise SystemExit(f"{bad} responses were not 200 {want or ''}: the benchmark is invalid")
    return len(latencies) / elapsed, latencies


# -- orchestration ----------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per target")
    args = ap.parse_args()

    redis_server = start_private_redis("service")
    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    rport, sport, fport = redis_server.port, free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        redis_url = redis_server.url
        me = [sys.executable, __file__]
        procs.append(subprocess.Popen(me + ["--x-service", str(sport), redis_url, str(tmp)]))
        PIDS[sport] = procs[-1].pid
        procs.append(subprocess.Popen(me + ["--x-floor", str(fport), redis_url]))
        PIDS[fport] = procs[-1].pid
        wait_port(sport)
        wait_port(fport)
        asyncio.run(_run(args, rport, sport, fport))
    finally:
        for p in reversed(procs):  # the servers; Redis after them
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        redis_server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


async def _run(args: argparse.Namespace, rport: int, sport: int, fport: int) -> None:
    from redis.asyncio import Redis

    proxy_req = request_bytes("/v1/chat/completions", sport, BODY, auth=True)
    lookup_req = request_bytes("/v1/cache/lookup", sport, b'{"request":' + BODY + b"}",
                               auth=True)
    floor_req = request_bytes("/floor", fport, BODY, auth=False)

    # Fill one entry through the service, then give the floor the very same stored bytes.
    reader, writer = await asyncio.open_connection("127.0.0.1", sport)
    states = [(await http_roundtrip(reader, writer, proxy_req))[1].get("x-cache") for _ in range(2)]
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

    targets = {"floor (FastAPI + 1 Redis GET)": (fport, floor_req, None),
               "service proxy hit": (sport, proxy_req, "HIT"),
               "service lookup hit": (sport, lookup_req, None)}
    for port, req, want in targets.values():  # warm connections, JIT-free but caches/pools
        await load(port, req, 4, 0.5, want)
    CPU_PER_REQUEST.clear()
    results: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in targets}
    cpu: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(args.rounds):
        for name, (port, req, want) in targets.items():
            results[name].append(await load(port, req, args.clients, args.seconds, want))
            cpu[name].append(CPU_PER_REQUEST[port][-1])

    print(f"\n{args.clients} concurrent clients, {args.rounds} x {args.seconds:.0f} s per target, "
          f"entry {len(raw)} bytes, loopback, one uvicorn worker each (uvloop, httptools)\n")
    print(f"{'target':34} {'hits/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU us/hit':>18}")
    summary: dict[str, tuple[float, float, float]] = {}
    for name, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        lat = sorted(x for _, lats in runs for x in lats)
        p50 = pct(lat, 0.50) * 1000
        p99 = pct(lat, 0.99) * 1000
        summary[name] = (rps, p50, p99)
        us = statistics.median(cpu[name]) * 1e6
        print(f"{name:34} {rps:9.0f} {p50:8.2f} {p99:8.2f} {us:18.0f}")
    f_rps, _, f_p99 = summary["floor (FastAPI + 1 Redis GET)"]
    print()
    for name in ("service proxy hit", "service lookup hit"):
        rps, _, p99 = summary[name]
        cpu_ratio = statistics.median(cpu["floor (FastAPI + 1 Redis GET)"]) / max(
            1e-9, statistics.median(cpu[name]))
        print(f"{name:34} throughput {rps / f_rps:5.2f}x floor (goal >= 0.80), "
              f"p99 {p99 / f_p99:5.2f}x floor (goal <= 1.50), "
              f"hits per server CPU-second {cpu_ratio:5.2f}x floor")
    mac_us, decode_us = _entry_check_us(raw)
    hit_us = statistics.median(cpu["service proxy hit"]) * 1e6
    print(f"\nentry check of a hit on bytes not seen before ({len(raw)} B): MAC {mac_us:.2f} us,"
          f" whole decode {decode_us:.2f} us; the MAC is {mac_us / hit_us:.1%} of a proxy hit's "
          f"server CPU ({hit_us:.0f} us)")
    print(f"\ncpu count {os.cpu_count()}; figures are for this machine and its load")


def _entry_check_us(raw: bytes) -> tuple[float, float]:
    """Microseconds to verify ``raw``'s MAC, and to decode it whole (MAC, msgpack, checks)."""
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
    if len(sys.argv) > 1 and sys.argv[1] == "--x-service":
        serve_service(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif len(sys.argv) > 1 and sys.argv[1] == "--x-floor":
        serve_floor(int(sys.argv[2]), sys.argv[3])
    else:
        main()
