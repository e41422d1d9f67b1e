"""The service's HTTP protocol (cachesvc/http_protocol.py): an answer leaves in one write, writes
never change order, and the lazily moved timer still closes connections slow to send a request.
Over real sockets (uvicorn with the protocol, in a thread) and on the transport wrapper alone."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cachesvc.http_protocol import TimedHttpProtocol, _OneWritePerAnswer
from tests.service_helpers import serving

HEAD_TIMEOUT = 0.5
BODY_TIMEOUT = 5.0


class _Recording:
    """A transport that records what is written to it (and is wrapped by the real one)."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner
        self.writes: list[bytes] = []
        self.events: list[str] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.events.append("write")
        if self.inner is not None:
            self.inner.write(data)

    def close(self) -> None:
        self.events.append("close")
        self.closing = True
        if self.inner is not None:
            self.inner.close()

    def abort(self) -> None:
        self.events.append("abort")
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing if self.inner is None else self.inner.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


WRITES: list[_Recording] = []


class _CountingProtocol(TimedHttpProtocol):
    def connection_made(self, transport: Any) -> None:
        WRITES.append(_Recording(transport))
        super().connection_made(WRITES[-1])


async def _app(scope: Any, receive: Any, send: Any) -> None:
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            await asyncio.sleep(0.05)  # the head waits for no chunk: it leaves on its own
            await send({"type": "http.response.body", "body": b"chunk%d\n" % i,
                        "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b"hello " + scope["path"].encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    def protocol(*args: Any, **kwargs: Any) -> TimedHttpProtocol:
        return _CountingProtocol(*args, header_timeout_s=HEAD_TIMEOUT,
                                 body_timeout_s=BODY_TIMEOUT, **kwargs)

    with serving(_app, http=protocol, lifespan="off") as srv:
        yield srv.port


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def _read_answers(sock: socket.socket, n: int, *, timeout: float = 5.0) -> bytes:
    """Read until ``n`` complete answers (by Content-Length or a chunked end) have arrived."""
    sock.settimeout(timeout)
    out = b""
    while out.count(b"HTTP/1.1 200") < n or not _complete(out, n):
        got = sock.recv(65536)
        assert got, f"closed after {out!r}"
        out += got
    return out


def _complete(data: bytes, n: int) -> bool:
    parts = data.split(b"HTTP/1.1 200")[1:]
    if len(parts) < n:
        return False
    last = parts[n - 1]
    if b"content-length: " in last:
        head, _, body = last.partition(b"\r\n\r\n")
        length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        return len(body) >= length
    return last.endswith(b"0\r\n\r\n")


class TestOneWritePerAnswer:
    def test_each_answer_of_a_keep_alive_connection_is_one_write(self, server: int) -> None:
        WRITES.clear()
        with socket.create_connection(("127.0.0.1", server)) as s:
            for i in range(5):
                s.sendall(_get(f"/a{i}"))
                answer = _read_answers(s, 1)
                assert answer.endswith(b"\r\n\r\nhello /a%d" % i), answer
        assert len(WRITES) == 1
        assert len(WRITES[0].writes) == 5
        assert all(w.startswith(b"HTTP/1.1 200") and w.endswith(b"hello /a%d" % i)
                   for i, w in enumerate(WRITES[0].writes))

    def test_pipelined_requests_are_answered_in_order(self, server: int) -> None:
        WRITES.clear()
        with socket.create_connection(("127.0.0.1", server)) as s:
            s.sendall(_get("/first") + _get("/second") + _get("/third"))
            answers = _read_answers(s, 3)
        bodies = [a.rpartition(b"\r\n\r\n")[2] for a in answers.split(b"HTTP/1.1 200")[1:]]
        assert bodies == [b"hello /first", b"hello /second", b"hello /third"]

    def test_a_streamed_answer_sends_its_head_without_waiting_for_a_chunk(
            self, server: int) -> None:
        WRITES.clear()
        with socket.create_connection(("127.0.0.1", server)) as s:
            s.sendall(_get("/stream"))
            s.settimeout(5)
            head = s.recv(65536)
            # The first chunk comes 50 ms after the head: the head was not held for it.
            assert head.startswith(b"HTTP/1.1 200") and b"chunk0" not in head, head
            rest = b""
            while not (head + rest).endswith(b"0\r\n\r\n"):
                rest += s.recv(65536)
        text = head + rest
        assert text.index(b"chunk0") < text.index(b"chunk1") < text.index(b"chunk2")
        assert WRITES[0].writes[0] == head


class TestTheWrapper:
    """The write-ordering rules, on a recording transport and a real event loop."""

    def test_a_held_write_goes_out_joined_with_the_next(self) -> None:
        async def go() -> _Recording:
            rec = _Recording()
            t = _OneWritePerAnswer(rec, asyncio.get_running_loop())  # type: ignore[arg-type]
            t.write(b"before ")
            t.hold_next = True
            t.write(b"head ")
            t.write(b"body")
            t.write(b" after")
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return rec

        rec = asyncio.run(go())
        assert rec.writes == [b"before ", b"head body", b" after"]

    def test_a_held_write_alone_leaves_on_the_next_turn_of_the_loop(self) -> None:
        async def go() -> tuple[list[bytes], list[bytes]]:
            rec = _Recording()
            t = _OneWritePerAnswer(rec, asyncio.get_running_loop())  # type: ignore[arg-type]
            t.hold_next = True
            t.write(b"head")
            now = list(rec.writes)
            await asyncio.sleep(0)
            return now, rec.writes

        now, later = asyncio.run(go())
        assert now == [] and later == [b"head"]

    def test_close_sends_what_is_held_first_and_abort_drops_it(self) -> None:
        async def go(end: str) -> _Recording:
            rec = _Recording()
            t = _OneWritePerAnswer(rec, asyncio.get_running_loop())  # type: ignore[arg-type]
            t.hold_next = True
            t.write(b"head")
            getattr(t, end)()
            await asyncio.sleep(0)
            return rec

        closed = asyncio.run(go("close"))
        assert closed.events == ["write", "close"] and closed.writes == [b"head"]
        aborted = asyncio.run(go("abort"))
        assert aborted.events == ["abort"] and aborted.writes == []


class TestTimeouts:
    def test_an_idle_keep_alive_connection_is_closed_by_the_header_timeout_not_the_body_one(
            self, server: int) -> None:
        """After an answer the next head has HEAD_TIMEOUT, though a BODY_TIMEOUT (10x longer)
        was armed for the body of the request before."""
        with socket.create_connection(("127.0.0.1", server)) as s:
            for _ in range(3):
                s.sendall(_get("/x"))
                _read_answers(s, 1)
            t0 = time.monotonic()
            s.settimeout(BODY_TIMEOUT + 5)
            assert s.recv(1) == b""
            assert time.monotonic() - t0 < HEAD_TIMEOUT + 2.0

    def test_a_request_whose_head_comes_just_in_time_is_served(self, server: int) -> None:
        """The timer moves with each request: heads arriving every 0.6 x HEAD_TIMEOUT, for
        longer than HEAD_TIMEOUT in all, are all served."""
        with socket.create_connection(("127.0.0.1", server)) as s:
            for _ in range(4):
                time.sleep(HEAD_TIMEOUT * 0.6)
                s.sendall(_get("/y"))
                assert _read_answers(s, 1).endswith(b"hello /y")

    def test_a_body_that_stops_is_cut_after_the_body_timeout(self, server: int) -> None:
        with socket.create_connection(("127.0.0.1", server)) as s:
            s.sendall(b"POST /z HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            t0 = time.monotonic()
            s.settimeout(BODY_TIMEOUT + 5)
            assert s.recv(1) == b""
            assert BODY_TIMEOUT - 0.5 < time.monotonic() - t0 < BODY_TIMEOUT + 3.0
