"""The router's end of a replica's many-requests channel (the protocol: tidal/server/mux.py).

One connection per replica carries every generation request the router sends there. The
requests of one event-loop pass go out in one write, and each read brings a record of every
stream's new events (one engine step of them), dispatched to the streams' readers: no wake-up,
socket read and HTTP parse per token and stream. A reply reads like upstream.Response (status,
headers, events(), read(), interrupt(), aclose()), so a Flight does not know which carried it.

The channel fails as a whole: when its connection drops (the replica died) every reply on it
raises UpstreamError, as each of their own connections would have, and the next request opens a
new channel (or finds the replica gone). A replica that answers the mux path with anything but a
channel (an older `tidal serve`, another server) is sent plain HTTP requests from then on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import SplitResult

from tidal.router.wire import EventSplitter, UpstreamError, connect, dechunk, parse_head
from tidal.server.mux import MUX_CONTENT_TYPE, MUX_PATH, MuxProtocolError, RecordReader, encode_record

_READ = 1 << 18
_MAX_RECORD = 1 << 30  # what the router accepts from its replicas (their replies are not size-limited either)


class ChannelUnsupported(Exception):
    """The replica answered the mux path with something else than a channel."""


class Channel:
    """One replica's channel: open() it, then post() requests over it."""

    def __init__(self, url: SplitResult, extra_headers: bytes, connect_timeout_s: float) -> None:
        self.url, self.extra, self.connect_timeout_s = url, extra_headers, connect_timeout_s
        self.streams: dict[int, ChannelResponse] = {}
        self.failed: str | None = None
        self._next = 0
        self._out: list[list[Any]] = []
        self._flushing = False
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None

    async def open(self) -> None:
        """Raises UpstreamError when no connection can be made, ChannelUnsupported when the replica
        has no channel to offer."""
        u = self.url
        reader, writer = await connect(u, self.connect_timeout_s, _READ)
        writer.write(
            (
                f"POST {u.path}{MUX_PATH} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: {MUX_CONTENT_TYPE}\r\n"
                "Transfer-Encoding: chunked\r\n"
            ).encode()
            + self.extra
            + b"\r\n"
        )
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.connect_timeout_s)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            writer.close()
            raise UpstreamError(f"channel to {u.netloc}: {type(e).__name__}: {e}") from None
        try:
            status, headers = parse_head(raw)
        except ValueError as e:  # not HTTP: the plain path will say so in its own words
            writer.close()
            raise ChannelUnsupported(str(e)) from None
        if status != 200 or headers.get("content-type") != MUX_CONTENT_TYPE:
            writer.close()
            raise ChannelUnsupported(f"status {status}, content-type {headers.get('content-type')!r}")
        self._writer = writer
        self._task = asyncio.get_running_loop().create_task(self._read(reader, headers))

    async def post(self, path: str, body: bytes) -> ChannelResponse:
        """Sends the request; returns once its reply's status is in (raises UpstreamError if the
        channel fails first)."""
        if self.failed is not None:
            raise UpstreamError(self.failed)
        sid, self._next = self._next, self._next + 1
        resp = self.streams[sid] = ChannelResponse(self, sid)
        self._send(["open", sid, self.url.path + path, body])
        await resp.head
        return resp

    def cancel(self, sid: int) -> None:
        """The client left: the replica aborts the request (its frames still in flight are dropped)."""
        if self.streams.pop(sid, None) is not None and self.failed is None:
            self._send(["cancel", sid])

    def _send(self, frame: list[Any]) -> None:
        self._out.append(frame)
        if not self._flushing:  # this pass's other frames go in the same write
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        frames, self._out = self._out, []
        if frames and self._writer is not None and self.failed is None:
            record = encode_record(frames)
            self._writer.write(b"%x\r\n%b\r\n" % (len(record), record))

    async def _read(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
        buf, records = bytearray(), RecordReader(_MAX_RECORD)
        try:
            if headers.get("transfer-encoding", "").lower() != "chunked":
                raise UpstreamError(f"expected a chunked channel, got headers {headers}")
            while True:
                data = await reader.read(_READ)
                if not data:
                    raise UpstreamError("connection closed mid-stream")
                buf += data
                body, done = dechunk(buf)
                for frame in records.feed(body):
                    self._dispatch(frame)
                if done:
                    raise UpstreamError("connection closed mid-stream: the replica ended the channel")
        except (UpstreamError, OSError, ValueError, MuxProtocolError) as e:
            self._fail(str(e) if isinstance(e, UpstreamError) else f"{type(e).__name__}: {e}")
        except asyncio.CancelledError:
            self._fail("the channel was closed")
            raise

    def _dispatch(self, frame: list[Any]) -> None:
        resp = self.streams.get(frame[1]) if len(frame) > 1 else None
        if resp is None:
            return  # cancelled: what the replica sent before it saw the cancel
        kind = frame[0]
        if kind == "body":
            resp.chunks.append(frame[2])
            resp.wake()
        elif kind == "start":
            resp.status, resp.headers = frame[2], {"content-type": frame[3]}
            resp.head.set_result(None)
        elif kind == "end":
            del self.streams[frame[1]]
            resp.ended = True
            if not resp.head.done():
                resp.head.set_exception(UpstreamError("the replica ended a reply before its status"))
            resp.wake()
        else:
            raise MuxProtocolError(f"unknown frame kind {kind!r}")

    def _fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
        if self._writer is not None:
            self._writer.close()
        streams, self.streams = self.streams, {}
        for resp in streams.values():
            resp.fail(reason)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._fail("the channel was closed")


class ChannelResponse:
    """One reply on a channel, read like upstream.Response."""

    __slots__ = ("channel", "sid", "status", "headers", "head", "chunks", "ended", "error", "_waiter")

    def __init__(self, channel: Channel, sid: int) -> None:
        self.channel, self.sid = channel, sid
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head: asyncio.Future = asyncio.get_running_loop().create_future()
        self.chunks: list[bytes] = []
        self.ended = False
        self.error: str | None = None
        self._waiter: asyncio.Future | None = None

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        if not self.head.done():
            self.head.set_exception(UpstreamError(reason))
        self.wake()

    async def _next(self) -> bytes | None:
        """What came since the last call, or None at the reply's end; UpstreamError once it failed
        (after the data that came before)."""
        while not self.chunks and not self.ended and self.error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self.chunks:
            data = b"".join(self.chunks) if len(self.chunks) > 1 else self.chunks[0]
            self.chunks.clear()
            return data
        if self.error is not None:
            raise UpstreamError(self.error)
        return None

    async def events(self) -> AsyncIterator[list[bytes]]:
        """The `data:` payloads of the event-stream reply, a list per channel read; ends at [DONE]."""
        split = EventSplitter()
        while not split.done:
            data = await self._next()
            if data is None:
                return
            batch = split.feed(data)
            if batch:
                yield batch

    async def read(self) -> bytes:
        out = []
        while (data := await self._next()) is not None:
            out.append(data)
        return b"".join(out)

    def interrupt(self) -> None:
        self.channel.cancel(self.sid)
        self.fail("interrupted: the request is moving")

    async def aclose(self) -> None:
        if not self.ended:
            self.channel.cancel(self.sid)
