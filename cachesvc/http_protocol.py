"""uvicorn's httptools protocol with a header timeout and a body timeout.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not one that sends
nothing after connecting, sends part of a request head and stops, or sends part of a body and
stops: such connections are held forever, and 500 of them are a cheap denial of service. This
protocol closes a connection whose request head (request line and headers) has not arrived
within ``header_timeout_s`` of the connection opening or of the previous answer, or whose body
has not arrived within ``body_timeout_s`` of its head.

NOTE: in the protocol rather than the app: one timer per connection, moved at the head and the
end of each request (as uvicorn moves its keep-alive timer), costs less per hit than a timeout
around every read of the body, and it also covers requests no route reads.
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

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm(self.header_timeout_s)  # the next request is bounded the same way

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def http_protocol(*, header_timeout_s: float, body_timeout_s: float) -> Any:
    """The ``http=`` argument for ``uvicorn.run`` / ``uvicorn.Config``."""
    return functools.partial(TimedHttpProtocol, header_timeout_s=header_timeout_s,
                             body_timeout_s=body_timeout_s)
