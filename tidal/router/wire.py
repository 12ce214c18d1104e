"""What both of the router's upstream transports read: chunked HTTP bodies and server-sent events."""

from __future__ import annotations


class UpstreamError(Exception):
    """The connection failed, or the reply was not HTTP/1.1 the router can read."""


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
