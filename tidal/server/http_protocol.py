"""uvicorn's h11 protocol with a deadline on reading a request's headers.

uvicorn bounds only the idle time *between* requests (timeout_keep_alive, armed when a response
completes); a connection that opens and sends nothing, or trickles its headers a byte at a time,
holds a slot for ever. Here every request's headers must arrive within `header_timeout_s` of the
connection opening (first request) or of its first byte (later requests); otherwise the
connection is closed.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def protocol_class(header_timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol subclass that uvicorn can construct (Config(http=...))."""
    return type("TidalH11Protocol", (_HeaderDeadline,), {"header_timeout_s": header_timeout_s})


class _HeaderDeadline(H11Protocol):
    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still inside a request's head
            self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
