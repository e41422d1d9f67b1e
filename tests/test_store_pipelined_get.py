"""The hit path's pipelined GET (cachesvc/store/pipelined_get.py), against real Redis: replies
reach their own callers, a late reply fails what is in flight within the timeout and the next GET
reconnects, and the connection honours the URL's db and credentials."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from cachesvc.store import StoreUnavailableError
from cachesvc.store.errors import StoreTimeoutError
from cachesvc.store.pipelined_get import PipelinedGet

pytestmark = pytest.mark.redis


def _getter(url: str, **kw: Any) -> PipelinedGet:
    client = Redis.from_url(url, socket_timeout=kw.pop("timeout", 0.5))
    getter = PipelinedGet.for_client(client, connect_timeout=0.5)
    assert getter is not None
    return getter


class TestPipelinedGet:
    async def test_concurrent_gets_each_receive_their_own_value(self, redis_url: str) -> None:
        r = Redis.from_url(redis_url)
        await r.mset({f"pg:{i}": f"value-{i}".encode() * (i % 7 + 1) for i in range(300)})
        getter = _getter(redis_url)
        try:
            keys = [f"pg:{i}" for i in range(300)] + ["pg:absent"]
            got = await asyncio.gather(*(getter.get(k) for k in keys))
            assert got[:-1] == [f"value-{i}".encode() * (i % 7 + 1) for i in range(300)]
            assert got[-1] is None
        finally:
            await getter.close()
            await r.aclose()

    async def test_a_late_reply_fails_every_get_in_flight_and_the_next_get_reconnects(
            self, redis_standalone: Any) -> None:
        r = Redis.from_url(redis_standalone.url)
        await r.set("pg:late", b"v")
        getter = _getter(redis_standalone.url, timeout=0.2)
        assert await getter.get("pg:late") == b"v"
        redis_standalone.pause()
        try:
            start = time.monotonic()
            results = await asyncio.gather(*(getter.get("pg:late") for _ in range(20)),
                                           return_exceptions=True)
            assert time.monotonic() - start < 1.0
            assert all(isinstance(x, StoreUnavailableError) and "Timeout" in str(x)
                       for x in results)
        finally:
            redis_standalone.resume()
        assert await getter.get("pg:late") == b"v"
        await getter.close()
        await r.aclose()

    async def test_a_watchdog_that_moves_on_keeps_the_timeout_for_later_gets(
            self, redis_standalone: Any) -> None:
        """GETs answered in time for three timeouts in a row never fail (the watchdog moves to
        the next GET's deadline), and a GET left unanswered after them still fails within its
        timeout."""
        r = Redis.from_url(redis_standalone.url)
        await r.set("pg:steady", b"v")
        getter = _getter(redis_standalone.url, timeout=0.2)
        try:
            loop = asyncio.get_running_loop()
            until = loop.time() + 0.6
            n = 0
            while loop.time() < until:
                assert await asyncio.gather(*(getter.get("pg:steady") for _ in range(5))) \
                    == [b"v"] * 5
                n += 5
                await asyncio.sleep(0.01)
            assert n > 50
            redis_standalone.pause()
            start = time.monotonic()
            with pytest.raises(StoreUnavailableError, match="TimeoutError"):
                # wait_for only so that a lost watchdog fails here rather than hanging
                await asyncio.wait_for(getter.get("pg:steady"), 2.0)
            assert 0.1 < time.monotonic() - start < 0.6
        finally:
            redis_standalone.resume()
            await getter.close()
            await r.aclose()

    async def test_the_url_db_is_the_one_read(self, redis_standalone: Any) -> None:
        url = redis_standalone.url.rsplit("/", 1)[0]
        r3 = Redis.from_url(url + "/3")
        await r3.set("pg:db", b"three")
        try:
            assert await _getter(url + "/3").get("pg:db") == b"three"
            assert await _getter(url + "/0").get("pg:db") is None
        finally:
            await r3.delete("pg:db")
            await r3.aclose()

    async def test_a_password_is_sent_and_a_wrong_one_is_unavailable_not_a_hang(
            self, redis_standalone: Any) -> None:
        admin = Redis.from_url(redis_standalone.url)
        await admin.set("pg:auth", b"secret-value")
        await admin.execute_command("ACL", "SETUSER", "pg-user", "on", ">pg-pass", "~pg:*",
                                    "+get")
        host = redis_standalone.url.split("//", 1)[1]
        try:
            ok = _getter(f"redis://pg-user:pg-pass@{host}")
            assert await ok.get("pg:auth") == b"secret-value"
            await ok.close()
            bad = _getter(f"redis://pg-user:wrong@{host}")
            with pytest.raises(StoreUnavailableError, match="refused the connection"):
                await bad.get("pg:auth")
        finally:
            await admin.execute_command("ACL", "DELUSER", "pg-user")
            await admin.delete("pg:auth")
            await admin.aclose()

    def test_tls_connections_are_left_to_redis_py(self) -> None:
        client = Redis.from_url("rediss://localhost:6390/0")
        assert PipelinedGet.for_client(client, connect_timeout=0.5) is None


class TestGuardedPipelinedGet:
    """The guard keeps no timer of its own for a GET the store bounds itself, and that GET
    still fails in time, as a timeout, when Redis stops answering."""

    async def test_the_guard_leaves_the_get_to_the_watchdog_and_it_fails_in_time(
            self, redis_standalone: Any) -> None:
        from cachesvc.breaker import CircuitBreaker
        from cachesvc.guarded_store import GuardedStore
        from cachesvc.store import open_store

        store = open_store(redis_standalone.url, socket_timeout=0.2, connect_timeout=0.5)
        try:
            assert GuardedStore(store, timeout_s=0.2, breaker=CircuitBreaker()).self_bounded \
                == {"get"}
            # A store whose own deadline is longer than the guard's keeps the guard's timer.
            assert GuardedStore(store, timeout_s=0.1, breaker=CircuitBreaker()).self_bounded \
                == frozenset()
            guard = GuardedStore(store, timeout_s=0.2, breaker=CircuitBreaker())
            await store.set("pg:guarded", b"v")
            assert await guard.call("get", lambda: store.get("pg:guarded")) == b"v"
            redis_standalone.pause()
            try:
                start = time.monotonic()
                failed = await asyncio.wait_for(
                    guard.call("get", lambda: store.get("pg:guarded")), 2.0)
                assert guard.failed(failed)
                assert 0.1 < time.monotonic() - start < 0.6
            finally:
                redis_standalone.resume()
        finally:
            await store.close()

    async def test_a_late_reply_is_a_timeout_error(self, redis_standalone: Any) -> None:
        """A TimeoutError, so the guard counts it as one (its metric label is "timeout")."""
        getter = _getter(redis_standalone.url, timeout=0.2)
        await getter.get("pg:any")  # connected
        redis_standalone.pause()
        try:
            with pytest.raises(StoreTimeoutError) as raised:
                await asyncio.wait_for(getter.get("pg:any"), 2.0)
            assert isinstance(raised.value, TimeoutError)
        finally:
            redis_standalone.resume()
            await getter.close()
