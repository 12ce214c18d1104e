"""What both of the router's upstream transports share: the connection to a replica, the reply
head, chunked HTTP bodies and server-sent events."""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import SplitResult


class UpstreamError(Exception):
    """The connection failed, or the reply was not HTTP/1.1 the router can read."""


async def connect(u: SplitResult, timeout_s: float, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the replica at `u` (TLS for https); UpstreamError when none can be made."""
    tls = ssl.create_default_context() if u.scheme == "https" else None
    try:
        return await asyncio.wait_for(
            asyncio.open_connection(u.hostname, u.port or (443 if tls else 80), ssl=tls, limit=limit), timeout_s
        )
    except (OSError, asyncio.TimeoutError) as e:
        raise UpstreamError(f"connect to {u.netloc}: {type(e).__name__}: {e}") from None


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """The status and headers (names lower-cased) of an HTTP/1.1 reply head; ValueError if it is not one."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.1 status line: {lines[0][:100]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


def dechunk(buf: bytearray) -> tuple[bytes, bool]:
    """Takes the whole chunks of a chunked body off the front of `buf`: their data, and whether
    the last chunk was among them. Raises ValueError on a chunk size that is not hex."""
    out, pos = [], 0
    done = False
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        if size == 0:
            if len(buf) < eol + 4:
                break
            pos, done = eol + 4, True  # no trailers: "0\r\n\r\n"
            break
        if len(buf) < eol + 2 + size + 2:
            break
        out.append(bytes(buf[eol + 2 : eol + 2 + size]))
        pos = eol + 2 + size + 2
    del buf[:pos]
    return b"".join(out), done


class EventSplitter:
    """The `data:` payloads of a server-sent event stream fed in pieces; `done` once [DONE] came."""

    __slots__ = ("pending", "done")

    def __init__(self) -> None:
        self.pending, self.done = b"", False

    def feed(self, data: bytes) -> list[bytes]:
        *whole, self.pending = (self.pending + data).split(b"\n\n")
        batch = [ev[6:] for ev in whole if ev.startswith(b"data: ")]
        if batch and batch[-1] == b"[DONE]":
            batch.pop()
            self.done = True
        return batch
