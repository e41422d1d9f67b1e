"""The hit path's Redis GET: one pipelined connection per process, replies parsed by hiredis.

A hit costs one GET. Through redis-py's asyncio client a GET also pays a pool lock, an
observability hook, a retry wrapper and a readiness check per call, which together cost more
CPU than the GET itself (``python bench/store.py`` measures both). None of that is needed on
this path: ``GuardedStore`` already bounds every call with its timeout, and its circuit breaker
decides when to try again.

So GETs go out on one connection, those of one turn of the event loop in one write, and replies
come back in order (Redis answers a connection's commands in the order it received them),
matched to their callers first-in, first-out. The connection is opened from the redis-py
client's own settings (host, port or unix socket, db, credentials), lazily, by the first caller;
everything else the store does (SET, purges, the registry) stays on redis-py. TLS connections
are left to redis-py (:meth:`PipelinedGet.for_client` returns None for them).

NOTE: a caller that gives up (its timeout cancels it) closes the connection. Every reply behind a
late one is later still, so the other GETs in flight fail at once (misses) instead of each
waiting out its own timeout, and the next GET opens a fresh connection.

The timeout is kept by one watchdog timer per connection, not a timer per GET: replies come in
order, so the GET waiting longest is always the first one due. The watchdog is set for the oldest
GET's deadline when none is pending; when it fires it fails the connection if that GET is still
unanswered, else it moves on to the deadline of the oldest GET still waiting, if any.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from typing import Any

import hiredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection

from cachesvc.store.errors import StoreTimeoutError, StoreUnavailableError


class _Replies(asyncio.Protocol):
    """One connection: commands written in order, replies handed to waiters in order, each
    waiter due ``timeout`` seconds after its command was sent."""

    def __init__(self, timeout: float) -> None:
        self.reader = hiredis.Reader()
        self.timeout = timeout
        # (waiter, deadline), oldest first
        self.waiters: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.outbox: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.watchdog: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(f"redis sent bytes that are not RESP: {exc}")
                return
            if reply is False:
                return
            if not self.waiters:
                self.fail("redis sent a reply nobody asked for")
                return
            waiter = self.waiters.popleft()[0]
            if not waiter.done():  # its caller may have given up
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"redis closed the connection{f': {exc}' if exc else ''}")

    def send(self, command: bytes) -> asyncio.Future[Any]:
        loop = self.loop
        waiter = loop.create_future()
        deadline = loop.time() + self.timeout
        self.waiters.append((waiter, deadline))
        if self.watchdog is None:
            self.watchdog = loop.call_at(deadline, self.watch)
        if not self.outbox:
            loop.call_soon(self.flush)
        self.outbox.append(command)
        return waiter

    def flush(self) -> None:
        # NOTE: the commands of one turn of the event loop go out in one write: under load many
        # requests reach their GET in the same turn, and a write to a socket costs more CPU
        # than the GET itself.
        if self.outbox and not self.closed:
            self.transport.write(b"".join(self.outbox))  # type: ignore[union-attr]
        self.outbox.clear()

    def watch(self) -> None:
        """The watchdog: fail the connection if its oldest GET is past due (see the module)."""
        self.watchdog = None
        if not self.waiters or self.closed:
            return
        deadline = self.waiters[0][1]
        if self.loop.time() >= deadline:
            self.fail(f"TimeoutError: redis did not answer a GET within {self.timeout} s; the "
                      "replies behind it are late too", timeout=True)
        else:
            self.watchdog = self.loop.call_at(deadline, self.watch)

    def fail(self, why: str, *, timeout: bool = False) -> None:
        """Close the connection; every caller still waiting gets ``StoreUnavailableError``
        (``StoreTimeoutError`` when ``timeout``)."""
        error = StoreTimeoutError if timeout else StoreUnavailableError
        self.closed = True
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            self.transport.abort()
        while self.waiters:
            waiter = self.waiters.popleft()[0]
            if not waiter.done():
                waiter.set_exception(error(why))


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%b\r\n" % (len(p), p))
    return b"".join(out)


class PipelinedGet:
    """``await get(key)``: the value or None, over one pipelined connection (see the module)."""

    def __init__(self, *, host: str = "localhost", port: int = 6379, path: str | None = None,
                 db: int = 0, username: str | None = None, password: str | None = None,
                 timeout: float = 0.25, connect_timeout: float = 0.5) -> None:
        self._where: dict[str, Any] = dict(path=path) if path else dict(host=host, port=port)
        self._hello = []
        if password is not None:
            self._hello.append(_command(b"AUTH", *([username.encode()] if username else []),
                                        password.encode()))
        if db:
            self._hello.append(_command(b"SELECT", str(db).encode()))
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._conn: _Replies | None = None
        self._connecting: asyncio.Future[_Replies] | None = None

    @property
    def timeout(self) -> float:
        """How long a GET may wait for its reply (the watchdog's deadline)."""
        return self._timeout

    @classmethod
    def for_client(cls, client: Any, *, connect_timeout: float) -> PipelinedGet | None:
        """One for a standalone ``redis.asyncio.Redis`` (TCP or unix socket), with its
        settings; None where redis-py must keep the GETs (TLS, a credential provider)."""
        pool = client.connection_pool
        kw = pool.connection_kwargs
        if pool.connection_class not in (Connection, UnixDomainSocketConnection) or kw.get(
                "credential_provider") is not None:
            return None
        return cls(host=kw.get("host", "localhost"), port=int(kw.get("port", 6379)),
                   path=kw.get("path"), db=int(kw.get("db", 0) or 0),
                   username=kw.get("username"), password=kw.get("password"),
                   timeout=kw.get("socket_timeout") or 0.25, connect_timeout=connect_timeout)

    async def get(self, key: str) -> bytes | None:
        conn = self._conn
        if conn is None or conn.closed or conn.loop is not asyncio.get_running_loop():
            conn = await self._connected()
        k = key.encode()
        waiter = conn.send(b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(k), k))
        try:
            reply = await waiter
        except asyncio.CancelledError:
            conn.fail("a GET was given up: the replies behind it are late too")
            raise
        if isinstance(reply, hiredis.ReplyError):
            raise StoreUnavailableError(f"redis refused GET: {reply}")
        return reply  # type: ignore[no-any-return]

    async def _connected(self) -> _Replies:
        # Concurrent callers share one connection attempt.
        pending = self._connecting
        loop = asyncio.get_running_loop()
        if pending is None or pending.done() or pending.get_loop() is not loop:
            pending = self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(pending)

    async def _connect(self) -> _Replies:
        loop = asyncio.get_running_loop()
        conn: _Replies | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                replies = functools.partial(_Replies, self._timeout)
                if "path" in self._where:
                    _, conn = await loop.create_unix_connection(replies, self._where["path"])
                else:
                    _, conn = await loop.create_connection(replies, self._where["host"],
                                                           self._where["port"])
                for command in self._hello:
                    reply = await conn.send(command)
                    if isinstance(reply, hiredis.ReplyError):
                        raise StoreUnavailableError(f"redis refused the connection: {reply}")
        except BaseException as exc:
            if conn is not None:
                conn.fail("the connection could not be set up")
            if isinstance(exc, (OSError, TimeoutError)):
                raise StoreUnavailableError(
                    f"redis unavailable: {type(exc).__name__}: {exc}") from exc
            raise
        self._conn = conn
        return conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.fail("the store was closed")
            self._conn = None
