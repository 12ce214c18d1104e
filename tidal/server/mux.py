"""One connection that carries many requests: the router's channel to a replica (`POST /tidal/mux`).

Over plain HTTP the router holds one connection per request, and every streamed token costs the
replica a socket write and the router a wake-up and a read. Here the router sends its requests as
frames in one long chunked request body, and the replica answers every request in frames of one
long chunked response, collecting what its requests produced while the event loop ran and writing
it at once: at 128 streams one write per engine step instead of 128.

Each request framed in is served by this same app, as if it had come over HTTP (the same routes,
auth, validation, error replies and metrics; its headers are the mux request's, so its
Authorization is checked per request), and its reply goes back as frames:

    router -> replica: ["open", id, path, body]   ["cancel", id]  (the client left: abort it)
    replica -> router: ["start", id, status, content_type]   ["body", id, bytes]   ["end", id]

A record on the wire is a 4-byte big-endian length and a msgpack array of frames (msgpack: plain
data, never pickle). A record over the server's body limit, a malformed frame or an unknown kind
ends the channel (its requests are cancelled, as when the connection drops). uvicorn's
--limit-concurrency counts a channel as one connection: the engine's own admission bounds the
requests in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

MUX_PATH = "/tidal/mux"
MUX_CONTENT_TYPE = "application/x-tidal-mux"
_LEN = struct.Struct(">I")

log = logging.getLogger("tidal.server")
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class MuxProtocolError(Exception):
    """A record or frame the channel cannot read."""


def encode_record(frames: list[list[Any]]) -> bytes:
    data = msgspec.msgpack.encode(frames)
    return _LEN.pack(len(data)) + data


class RecordReader:
    """Records out of a byte stream fed in pieces; each is checked against `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit, self.buf = limit, bytearray()
        self._decode = msgspec.msgpack.Decoder().decode

    def feed(self, data: bytes) -> list[list[Any]]:
        """The frames of every record completed by `data`."""
        self.buf += data
        frames: list[list[Any]] = []
        pos, buf = 0, self.buf
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > self.limit:
                raise MuxProtocolError(f"a record of {n} bytes: expected at most {self.limit} (--max-body-bytes)")
            if len(buf) - pos - 4 < n:
                break
            try:
                record = self._decode(bytes(buf[pos + 4 : pos + 4 + n]))
            except msgspec.DecodeError as e:
                raise MuxProtocolError(f"a record that is not msgpack: {e}") from None
            if not isinstance(record, list) or not all(isinstance(f, list) and f for f in record):
                raise MuxProtocolError("a record must be an array of frames, each a non-empty array")
            frames += record
            pos += 4 + n
        del buf[:pos]
        return frames


class _Sub:
    """One request served over the channel."""

    __slots__ = ("task", "gone", "ended")

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.gone = asyncio.Event()  # the router cancelled it, or the channel ended
        self.ended = False  # its reply's last frame is out


class MuxServer:
    """Serves one channel: `app` is the outermost ASGI app of the replica (sub-requests go through
    all of it)."""

    def __init__(self, app: ASGIApp, scope: dict, receive, send, limit: int) -> None:
        self.app, self.scope, self.receive, self.send = app, scope, receive, send
        self.reader = RecordReader(limit)
        self.subs: dict[int, _Sub] = {}
        self.out: list[list[Any]] = []
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._closed = False

    def close(self) -> None:
        """End the channel (the server is shutting down): its requests are cancelled, what they
        sent goes out, then the reply ends."""
        self._closing.set()

    async def run(self, registry: set) -> None:
        """Serves the channel until the router ends it, it breaks, or close(); in `registry` meanwhile."""
        await self.send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", MUX_CONTENT_TYPE.encode())]}
        )
        writer = asyncio.ensure_future(self._write())
        reading = asyncio.ensure_future(self._read())
        closing = asyncio.ensure_future(self._closing.wait())
        registry.add(self)
        try:
            await asyncio.wait({reading, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            registry.discard(self)
            for t in (reading, closing):
                t.cancel()
            await asyncio.gather(reading, closing, return_exceptions=True)
            self._closed = True
            for sub in self.subs.values():
                sub.gone.set()
            tasks = [s.task for s in self.subs.values() if s.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=30.0)
            self._wake.set()
            with contextlib.suppress(Exception):
                await writer
            with contextlib.suppress(OSError, RuntimeError):
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.receive()
                if msg["type"] == "http.disconnect":
                    return
                for frame in self.reader.feed(msg.get("body", b"")):
                    self._handle(frame)
                if not msg.get("more_body", False):  # the router sends no more: serve what it sent
                    await asyncio.gather(*(s.task for s in list(self.subs.values()) if s.task), return_exceptions=True)
                    return
        except MuxProtocolError as e:
            log.warning("mux channel from %s closed: %s", self.scope.get("client"), e)

    def _handle(self, frame: list[Any]) -> None:
        kind = frame[0]
        if kind == "open" and len(frame) == 4:
            _, sid, path, body = frame
            if not isinstance(sid, int) or not isinstance(path, str) or not path.startswith("/"):
                raise MuxProtocolError(f'open: expected ["open", int id, "/path", bytes body], got {frame[:3]!r}')
            if not isinstance(body, bytes) or sid in self.subs or path == MUX_PATH:
                raise MuxProtocolError(f"open {sid}: a bytes body, an id not in use and not the mux path expected")
            sub = self.subs[sid] = _Sub()
            sub.task = asyncio.ensure_future(self._serve(sid, sub, path, body))
        elif kind == "cancel" and len(frame) == 2 and isinstance(frame[1], int):
            cancelled = self.subs.get(frame[1])
            if cancelled is not None:  # else it ended already: its frames crossed the cancel
                cancelled.gone.set()
        else:
            raise MuxProtocolError(f"unknown frame {str(frame)[:80]}: expected open or cancel")

    async def _serve(self, sid: int, sub: _Sub, path: str, body: bytes) -> None:
        hop = (b"content-length", b"transfer-encoding", b"content-type")
        headers = [(k, v) for k, v in self.scope.get("headers", ()) if k not in hop]
        scope = {
            **self.scope,
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [*headers, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "state": dict(self.scope.get("state") or {}),
        }
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await sub.gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg: dict) -> None:
            if sub.ended or self._closed:
                return
            if msg["type"] == "http.response.start":
                ctype = next((v for k, v in msg.get("headers", ()) if k.lower() == b"content-type"), b"")
                self._emit(["start", sid, msg["status"], ctype.decode("latin-1")])
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    self._emit(["body", sid, bytes(msg["body"])])
                if not msg.get("more_body", False):
                    sub.ended = True
                    self._emit(["end", sid])

        try:
            await self.app(scope, receive, send)
        except Exception:
            log.exception("mux request %d (%s) failed", sid, path)
        finally:
            if not sub.ended and not self._closed:
                sub.ended = True
                self._emit(["end", sid])  # the router reads a reply cut short as a failed stream
            self.subs.pop(sid, None)

    def _emit(self, frame: list[Any]) -> None:
        self.out.append(frame)
        self._wake.set()

    async def _write(self) -> None:
        """Everything the requests produced since the last write, in one write: the wake-up runs
        after the request tasks woken with it, so one engine step's outputs go out together."""
        while not (self._closed and not self.out):
            await self._wake.wait()
            self._wake.clear()
            if not self.out:
                continue
            frames, self.out = self.out, []
            await self.send({"type": "http.response.body", "body": encode_record(frames), "more_body": True})
