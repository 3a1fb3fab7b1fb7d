"""uvicorn's HTTP/1.1 protocol with the timeouts it lacks: request headers and an idle body.

uvicorn closes a keep-alive connection that idles between requests, but a connection that sends
nothing, sends its headers a byte at a time (slowloris) or stalls mid-body holds its socket for
ever. Here a connection must finish its request headers within ``header_timeout_s`` of its first
byte (or of opening), and a request body may go at most ``body_idle_timeout_s`` without data;
otherwise the connection is closed (an upload cut off this way is a client disconnect to the app).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    body_idle_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._guard: asyncio.TimerHandle | None = None
        self._request: Any = None  # the cycle whose headers were last seen complete
        self._arm(self.header_timeout_s)  # a connection that never sends a byte is closed too

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle is not self._request:
            self._request = self.cycle  # headers complete: from now on only the body's pace counts
            self._cancel()
        if self.cycle is not None and self.cycle.more_body:
            self._arm(self.body_idle_timeout_s)  # restarted by every piece of the body
        elif self.cycle is None or self.cycle.response_complete:
            if self._guard is None:
                self._arm(self.header_timeout_s)  # the next request's headers, from their first byte
        else:
            self._cancel()  # the body is in: the app is working on the response

    def on_response_complete(self) -> None:
        self._cancel()  # between requests uvicorn's own keep-alive timeout applies
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._cancel()
        self._guard = self.loop.call_later(seconds, self._expire)

    def _cancel(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _expire(self) -> None:
        self._guard = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(header_timeout_s: float, body_idle_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with these timeouts."""
    attrs = {"header_timeout_s": header_timeout_s, "body_idle_timeout_s": body_idle_timeout_s}
    return type("GuardedH11", (GuardedH11Protocol,), attrs)
