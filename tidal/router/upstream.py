"""The router's upstream generation streams: a small HTTP/1.1 client on asyncio streams.

Keep-alive connections per replica; a response's chunked body is decoded straight from each
socket read, and its server-sent events come out per read, so a burst of events costs one wake-up.
httpx spent ~30 µs of CPU per streamed event (its transport layers, h11, line decoding), this
~10 µs in a micro-benchmark (benchmarks/README.md, Replicas); on a shared host the router's CPU is
taken from the replicas'. Control calls, probes and the proxy keep using httpx.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

IDLE_S = 2.0  # reuse an idle connection only this long (uvicorn closes after 5 s idle)
MAX_IDLE = 512  # idle connections kept per replica
_READ = 1 << 16


class UpstreamError(Exception):
    """The connection failed, or the reply was not HTTP/1.1 the router can read."""


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
        out, buf, pos = [], self.buf, 0
        while not self.done:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                if len(buf) < eol + 4:
                    break
                pos, self.done = eol + 4, True  # no trailers: "0\r\n\r\n"
                break
            if len(buf) < eol + 2 + size + 2:
                break
            out.append(bytes(buf[eol + 2 : eol + 2 + size]))
            pos = eol + 2 + size + 2
        del buf[:pos]
        return b"".join(out)

    async def events(self) -> AsyncIterator[list[bytes]]:
        """The `data:` payloads of a text/event-stream reply, a list per socket read; ends at [DONE]."""
        if self.headers.get("transfer-encoding", "").lower() != "chunked":
            raise UpstreamError(f"expected a chunked event stream, got headers {self.headers}")
        pending = b""
        try:
            while not self.done:
                if not await self._more():
                    raise UpstreamError("connection closed mid-stream")
                pending += self._chunks()
                *whole, pending = pending.split(b"\n\n")
                batch = [ev[6:] for ev in whole if ev.startswith(b"data: ")]
                if batch and batch[-1] == b"[DONE]":
                    batch.pop()
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

    async def aclose(self) -> None:
        """Back to the pool when the body was read to its end, else the connection closes."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.done and not self.buf and self.headers.get("connection", "").lower() != "close":
            self.pool.release(self.key, conn)
        else:
            conn.close()


class Upstream:
    """POST a JSON body to a replica; the response's head read, its body left to the caller."""

    def __init__(self, headers: dict[str, str] | None = None, connect_timeout_s: float = 5.0) -> None:
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
        self.connect_timeout_s = connect_timeout_s
        self.idle: dict[str, list[_Conn]] = {}

    async def post(self, base_url: str, path: str, body: bytes) -> Response:
        """Raises UpstreamError when no connection can be made or the reply head is unreadable."""
        u = urlsplit(base_url)
        key = f"{u.scheme}://{u.netloc}"
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
        raw = await conn.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.1 status line: {lines[0][:100]!r}")
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        return Response(int(parts[1]), headers, conn, self, key)

    async def _connect(self, u) -> _Conn:
        tls = ssl.create_default_context() if u.scheme == "https" else None
        port = u.port or (443 if tls else 80)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(u.hostname, port, ssl=tls, limit=_READ * 4), self.connect_timeout_s
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise UpstreamError(f"connect to {u.netloc}: {type(e).__name__}: {e}") from None
        return _Conn(reader, writer)

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

    def close(self) -> None:
        for conns in self.idle.values():
            for c in conns:
                c.close()
        self.idle.clear()
