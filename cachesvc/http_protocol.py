"""uvicorn's httptools protocol with a header timeout, a body timeout, and one write per answer.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not one that sends
nothing after connecting, sends part of a request head and stops, or sends part of a body and
stops: such connections are held forever, and 500 of them are a cheap denial of service. This
protocol closes a connection whose request head (request line and headers) has not arrived
within ``header_timeout_s`` of the connection opening or of the previous answer, or whose body
has not arrived within ``body_timeout_s`` of its head.

NOTE: in the protocol rather than the app: one timer per connection costs less per hit than a
timeout around every read of the body, and it also covers requests no route reads. The timer is
moved lazily: arming sets a deadline, and a timer is created only when none is pending or the
pending one would fire after the new deadline; a timer that fires early re-arms for the deadline.
On a keep-alive connection under load that is one timer every ``header_timeout_s``, not two
timers made and cancelled per request.

uvicorn writes an answer's head (status line and headers) and its body with two
``transport.write`` calls, and each is a ``send`` system call: the answer leaves in two TCP
segments, and the second call costs more CPU than a cache hit's own work (py-spy under
``bench/service.py``: a fifth of the service's CPU was in those writes). The connection's
transport is therefore wrapped (:class:`_OneWritePerAnswer`): the first write after a request
head arrives is held and goes out joined with the next write, which for an answer of known
length is its body, in the same step of the event loop. Writes never change order; a held write
goes out at the latest on the loop's next turn (a streamed answer whose first chunk is not
ready), before a close, and is dropped by an abort.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class TimedHttpProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that closes connections slow to send a request."""

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, body_timeout_s: float = 30.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None

    def _arm(self, seconds: float) -> None:
        loop = self.loop
        deadline = self._deadline = loop.time() + seconds
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._check)

    def _disarm(self) -> None:
        # The pending timer stays: it finds no deadline and goes (cheaper than a cancel now
        # and a new timer at the next arm).
        self._deadline = None

    def _check(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if self.loop.time() < deadline:  # moved since this timer was set
            self._timer = self.loop.call_at(deadline, self._check)
            return
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_OneWritePerAnswer(transport, self.loop))  # type: ignore[arg-type]
        self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s)
        self.transport.hold_next = True  # type: ignore[attr-defined]  # the answer's head
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(self.header_timeout_s)  # the next request is bounded the same way

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)


class _OneWritePerAnswer:
    """A connection's transport, holding the first write after ``hold_next`` is set until the
    next write, so that an answer's head and body leave in one ``send`` (see the module)."""

    __slots__ = ("transport", "loop", "held", "hold_next", "is_closing")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        # Bound once: uvicorn and the protocol ask it on every answer (__getattr__ is slower).
        self.is_closing = transport.is_closing
        self.held: bytes | None = None
        self.hold_next = False

    def write(self, data: bytes) -> None:
        held = self.held
        if held is not None:
            self.held = None
            self.transport.write(held + data)
        elif self.hold_next:
            self.hold_next = False
            self.held = bytes(data)
            self.loop.call_soon(self.flush)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        held = self.held
        if held is not None:
            self.held = None
            if not self.transport.is_closing():  # a lost connection takes no more writes
                self.transport.write(held)

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self.held = None
        self.transport.abort()

    def __getattr__(self, name: str) -> Any:
        # Everything else (get_extra_info, pause_reading, ...) is the transport's.
        return getattr(self.transport, name)


def http_protocol(*, header_timeout_s: float, body_timeout_s: float) -> Any:
    """The ``http=`` argument for ``uvicorn.run`` / ``uvicorn.Config``."""
    return functools.partial(TimedHttpProtocol, header_timeout_s=header_timeout_s,
                             body_timeout_s=body_timeout_s)
