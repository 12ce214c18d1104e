"""The router's upstream HTTP/1.1 client (a connection per request: channels off) against a
scripted asyncio server on 127.0.0.1: chunked event streams split at every byte boundary,
keep-alive reuse, a stale kept connection, errors."""
from __future__ import annotations

import asyncio

import pytest

from tidal.router.upstream import Upstream, UpstreamError

EVENTS = [b'data: {"i": %d}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]


def _chunked(payload: bytes, sizes: list[int]) -> bytes:
    out, pos = b"", 0
    for n in sizes:
        out += b"%x\r\n%s\r\n" % (n, payload[pos:pos + n])
        pos += n
    return out + b"0\r\n\r\n"


class Scripted:
    """Answers each request on a connection with the next scripted reply (bytes, written in
    `pieces` parts); a reply of None closes the connection instead, a (bytes, "close") after it."""

    def __init__(self, replies: list[bytes | None], pieces: int = 1) -> None:
        self.replies, self.pieces, self.connections, self.requests = list(replies), pieces, 0, []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                n = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
                self.requests.append(head + await reader.readexactly(n))
                reply = self.replies.pop(0)
                if reply is None:
                    break
                reply, close = reply if isinstance(reply, tuple) else (reply, None)
                step = max(1, len(reply) // self.pieces)
                for i in range(0, len(reply), step):
                    writer.write(reply[i:i + step])
                    await writer.drain()
                if close:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()


def _stream_reply(sizes: list[int]) -> bytes:
    body = b"".join(EVENTS)
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + \
        _chunked(body, sizes)


async def _read_all(up: Upstream, url: str) -> list[bytes]:
    resp = await up.post(url, "/generate", b'{"x": 1}')
    assert resp.status == 200
    got = [p async for batch in resp.events() for p in batch]
    await resp.aclose()
    return got


@pytest.mark.parametrize("pieces", [1, 7, 1000])
async def test_events_survive_any_split_and_the_connection_is_reused(pieces):
    body_len = len(b"".join(EVENTS))
    sizes = [3, 20, body_len - 23]                       # chunk borders inside events too
    srv = Scripted([_stream_reply(sizes), _stream_reply([body_len])], pieces=pieces)
    up = Upstream({"Authorization": "Bearer k"}, channels=False)
    async with srv as url:
        for _ in range(2):
            assert await _read_all(up, url) == [b'{"i": %d}' % i for i in range(5)]
    assert srv.connections == 1                          # the second request reused the first connection
    assert b"Authorization: Bearer k\r\n" in srv.requests[0] and srv.requests[0].endswith(b'{"x": 1}')
    up.close()


async def test_a_kept_connection_the_server_closed_is_retried_on_a_fresh_one():
    body_len = len(b"".join(EVENTS))
    srv = Scripted([_stream_reply([body_len]), None, _stream_reply([body_len])])
    up = Upstream(channels=False)
    async with srv as url:
        await _read_all(up, url)
        assert len(await _read_all(up, url)) == 5       # the kept one is closed: a new one answers
    assert srv.connections == 2
    up.close()


async def test_error_replies_and_a_stream_cut_short():
    err = b'{"error": {"message": "bad", "param": "x"}}'
    cut = _stream_reply([len(b"".join(EVENTS))])[:-40]
    srv = Scripted([b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(err), err), (cut, "close")])
    up = Upstream(channels=False)
    async with srv as url:
        resp = await up.post(url, "/generate", b"{}")
        assert resp.status == 400 and await resp.read() == err
        await resp.aclose()
        resp = await up.post(url, "/generate", b"{}")
        with pytest.raises(UpstreamError, match="closed mid-stream"):
            async for _ in resp.events():
                pass
        await resp.aclose()
    with pytest.raises(UpstreamError, match="connect"):
        await up.post(url, "/generate", b"{}")          # nobody listens there any more
    up.close()
