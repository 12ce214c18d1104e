"""The router's upstream generation streams: over the replica's channel (channel.py) when it has
one, else a small HTTP/1.1 client on asyncio streams.

Keep-alive connections per replica; a response's chunked body is decoded straight from each
socket read, and its server-sent events come out per read, so a burst of events costs one wake-up.
httpx spent ~30 µs of CPU per streamed event (its transport layers, h11, line decoding), this
~10 µs in a micro-benchmark (benchmarks/README.md, Replicas); on a shared host the router's CPU is
taken from the replicas'. Control calls, probes and the proxy keep using httpx.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from tidal.router.channel import Channel, ChannelUnsupported
from tidal.router.wire import EventSplitter, UpstreamError, connect, dechunk, parse_head

__all__ = ["Reply", "Response", "Upstream", "UpstreamError"]

log = logging.getLogger("tidal.router")
IDLE_S = 2.0  # reuse an idle connection only this long (uvicorn closes after 5 s idle)
MAX_IDLE = 512  # idle connections kept per replica
_READ = 1 << 16


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def close(self) -> None:
        self.writer.close()


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    conn: _Conn | None
    pool: Upstream
    key: str
    buf: bytearray = field(default_factory=bytearray)  # read, not yet decoded
    done: bool = False  # the body is complete

    async def _more(self) -> bool:
        if self.conn is None:
            raise UpstreamError("the response was read after aclose(): its connection is gone")
        data = await self.conn.reader.read(_READ)
        if not data:
            return False
        self.buf += data
        return True

    def _chunks(self) -> bytes:
        """The chunked body's data that `buf` holds whole; sets `done` at the last chunk."""
        if self.done:
            return b""
        data, self.done = dechunk(self.buf)
        return data

    async def events(self) -> AsyncIterator[list[bytes]]:
        """The `data:` payloads of a text/event-stream reply, a list per socket read; ends at [DONE]."""
        if self.headers.get("transfer-encoding", "").lower() != "chunked":
            raise UpstreamError(f"expected a chunked event stream, got headers {self.headers}")
        split = EventSplitter()
        try:
            while not self.done:
                if not await self._more():
                    raise UpstreamError("connection closed mid-stream")
                batch = split.feed(self._chunks())
                if split.done:
                    while not self.done and await self._more():
                        self._chunks()
                    if batch:
                        yield batch
                    return
                if batch:
                    yield batch
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            self.done = False
            raise UpstreamError(f"{type(e).__name__}: {e}") from None

    async def read(self) -> bytes:
        """The whole body (Content-Length or chunked)."""
        try:
            if "content-length" in self.headers:
                n = int(self.headers["content-length"])
                while len(self.buf) < n and await self._more():
                    pass
                body, self.done = bytes(self.buf[:n]), len(self.buf) >= n
                del self.buf[:n]
                return body
            out = []
            while True:
                out.append(self._chunks())
                if self.done or not await self._more():
                    return b"".join(out)
        except (OSError, ValueError) as e:
            raise UpstreamError(f"{type(e).__name__}: {e}") from None

    def interrupt(self) -> None:
        """Stop the reading of this reply now (a drain moves its request): its reader wakes and fails."""
        if self.conn is not None:
            self.conn.close()

    async def aclose(self) -> None:
        """Back to the pool when the body was read to its end, else the connection closes."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.done and not self.buf and self.headers.get("connection", "").lower() != "close":
            self.pool.release(self.key, conn)
        else:
            conn.close()


class Reply(Protocol):
    """A reply being read: this module's Response, or a channel's (channel.py)."""

    status: int
    headers: dict[str, str]

    def events(self) -> AsyncIterator[list[bytes]]: ...

    async def read(self) -> bytes: ...

    def interrupt(self) -> None: ...

    async def aclose(self) -> None: ...


class Upstream:
    """POST a JSON body to a replica; the response's head read, its body left to the caller.

    With `channels` on, the requests to a replica share its many-requests channel (channel.py);
    a replica that offers none gets a connection per request."""

    def __init__(
        self, headers: dict[str, str] | None = None, connect_timeout_s: float = 5.0, channels: bool = True
    ) -> None:
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
        self.connect_timeout_s = connect_timeout_s
        self.idle: dict[str, list[_Conn]] = {}
        self.use_channels = channels
        self.channels: dict[str, Channel] = {}
        self.no_channel: set[str] = set()  # replicas that answered the mux path with something else
        self._opening: dict[str, asyncio.Future] = {}

    async def post(self, base_url: str, path: str, body: bytes) -> Reply:
        """Raises UpstreamError when no connection can be made or the reply head is unreadable."""
        u = urlsplit(base_url)
        key = f"{u.scheme}://{u.netloc}"
        if self.use_channels and key not in self.no_channel:
            channel = await self._channel(key, u)
            if channel is not None:
                return await channel.post(path, body)
        return await self._post_http(u, key, path, body)

    async def _channel(self, key: str, u) -> Channel | None:
        """The replica's open channel; one is opened (once, for every caller waiting) when none is."""
        channel = self.channels.get(key)
        if channel is not None and channel.failed is None:
            return channel
        opening = self._opening.get(key)
        if opening is None:
            opening = self._opening[key] = asyncio.ensure_future(self._open_channel(key, u))
            opening.add_done_callback(lambda _: self._opening.pop(key, None))
        return await asyncio.shield(opening)

    async def _open_channel(self, key: str, u) -> Channel | None:
        channel = Channel(u, self.extra, self.connect_timeout_s)
        try:
            await channel.open()
        except ChannelUnsupported as e:
            self.no_channel.add(key)
            log.info("%s offers no channel (%s): a connection per request", key, e)
            return None
        self.channels[key] = channel
        return channel

    async def _post_http(self, u, key: str, path: str, body: bytes) -> Response:
        head = (
            (
                f"POST {u.path}{path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
            ).encode()
            + self.extra
            + b"\r\n"
        )
        reused = self._take(key)
        if reused is not None:
            try:  # a kept connection the replica closed meanwhile fails before any reply byte: retry fresh
                return await self._exchange(reused, key, head + body)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                reused.close()
                partial = isinstance(e, asyncio.IncompleteReadError) and bool(e.partial)
                if isinstance(e, (asyncio.LimitOverrunError, ValueError)) or partial:
                    raise UpstreamError(f"{type(e).__name__}: {e}") from None
        conn = await self._connect(u)
        try:
            return await self._exchange(conn, key, head + body)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            conn.close()
            raise UpstreamError(f"{type(e).__name__}: {e}") from None

    async def _exchange(self, conn: _Conn, key: str, request: bytes) -> Response:
        conn.writer.write(request)
        await conn.writer.drain()
        status, headers = parse_head(await conn.reader.readuntil(b"\r\n\r\n"))
        return Response(status, headers, conn, self, key)

    async def _connect(self, u) -> _Conn:
        return _Conn(*await connect(u, self.connect_timeout_s, _READ * 4))

    def _take(self, key: str) -> _Conn | None:
        conns = self.idle.get(key)
        now = time.monotonic()
        while conns:
            c = conns.pop()
            if now - c.idle_since < IDLE_S and not c.reader.at_eof():
                return c
            c.close()
        return None

    def release(self, key: str, conn: _Conn) -> None:
        conns = self.idle.setdefault(key, [])
        if len(conns) >= MAX_IDLE:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)

    def forget(self, base_url: str) -> None:
        """A replica left the router: its channel and kept connections close."""
        u = urlsplit(base_url)
        key = f"{u.scheme}://{u.netloc}"
        channel = self.channels.pop(key, None)
        if channel is not None:
            channel.close()
        for conn in self.idle.pop(key, []):
            conn.close()
        self.no_channel.discard(key)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
        for conns in self.idle.values():
            for c in conns:
                c.close()
        self.idle.clear()
