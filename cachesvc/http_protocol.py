"""uvicorn's httptools protocol with a header timeout.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not one that sends
nothing after connecting, or sends part of a request head and stops: such connections are held
forever, and 500 of them are a cheap denial of service. This protocol closes a connection whose
request head (request line and headers) has not arrived within ``header_timeout_s`` of the
connection opening or of the previous answer. The body's own time bound is the app's
(:mod:`cachesvc.body_limit`), so it holds under any server.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` that closes connections slow to send a request head."""

    def __init__(self, *args: Any, header_timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's head is bounded the same way

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def http_protocol(header_timeout_s: float) -> Any:
    """The ``http=`` argument for ``uvicorn.run`` / ``uvicorn.Config``."""
    return functools.partial(HeaderTimeoutProtocol, header_timeout_s=header_timeout_s)
