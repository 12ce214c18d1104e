"""The replica's many-requests channel (POST /tidal/mux) against a real `tidal serve`, driven by
the router's own client (tidal/router/channel.py): what a request gets over it equals what it
gets over HTTP, a cancel aborts the request in the engine, auth is checked per request, and a
malformed record ends the channel alone."""
from __future__ import annotations

import asyncio
import json
import re
import struct
import time
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest

from tidal.router.channel import Channel
from tidal.router.upstream import Upstream, UpstreamError
from tidal.server.mux import MUX_PATH, encode_record

REQUESTS = [
    ("/v1/completions", {"prompt": [5, 6, 7, i], "max_tokens": 12, "temperature": 0.0, "ignore_eos": True,
                         "stream": True, "return_token_ids": True}) for i in range(4)
] + [
    ("/generate", {"input_ids": [9, 8, i], "sampling_params": {"max_new_tokens": 10, "temperature": 0.0,
                                                               "ignore_eos": True},
                   "stream": True, "incremental_streaming_output": True}) for i in range(3)
] + [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 8,
                              "temperature": 0.0, "ignore_eos": True}) for i in range(2)
] + [
    ("/v1/completions", {"prompt": "abc", "max_tokens": 6, "temperature": 0.0, "n": 2, "ignore_eos": True}),
    ("/v1/completions", {"prompt": [1, 2], "max_tokens": 0}),   # refused: 400 names the field
]


def _channel(url: str, headers: dict[str, str] | None = None) -> Channel:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
    return Channel(urlsplit(url), extra, 5.0)


def _essence(path: str, body: dict, status: int, raw: bytes) -> object:
    """What must match between the transports: token ids and texts (ids and timestamps differ)."""
    if status != 200:
        return status, json.loads(raw)["error"]["param"]
    if not body.get("stream"):
        data = json.loads(raw)
        return [(c.get("text") or c["message"]["content"], c["finish_reason"]) for c in data["choices"]]
    events = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]
    if path == "/generate":   # (a stream may group its tokens into events differently)
        return [t for e in events for t in e["output_ids"]], events[-1]["meta_info"]["finish_reason"]
    return [t for e in events for c in e["choices"] for t in c.get("token_ids") or ()]


async def _over_channel(channel: Channel, path: str, body: dict) -> tuple[int, bytes]:
    resp = await channel.post(path, msgspec.json.encode(body))
    try:
        return resp.status, await resp.read()
    finally:
        await resp.aclose()


async def test_requests_over_one_channel_equal_their_http_replies(server):
    async with httpx.AsyncClient(timeout=60) as http:
        direct = await asyncio.gather(*(http.post(server.url + p, json=b) for p, b in REQUESTS))
    channel = _channel(server.url)
    await channel.open()
    try:
        over = await asyncio.gather(*(_over_channel(channel, p, b) for p, b in REQUESTS))
        assert channel.streams == {}          # every reply ended and left the channel
    finally:
        channel.close()
    for (path, body), d, (status, raw) in zip(REQUESTS, direct, over):
        assert status == d.status_code, (path, raw[:200])
        assert _essence(path, body, status, raw) == _essence(path, body, d.status_code, d.content), path
    assert over[-1][0] == 400


def _abort_count(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(r'^tidal_requests_total\{[^}]*finish_reason="abort"[^}]*\} (\S+)$',
                                            text, re.M))


async def test_closing_a_reply_early_aborts_its_request(server):
    before = _abort_count(server.url)
    channel = _channel(server.url)
    await channel.open()
    try:
        body = {"prompt": [3, 4], "max_tokens": 400, "temperature": 0.0, "ignore_eos": True, "stream": True}
        resp = await channel.post("/v1/completions", msgspec.json.encode(body))
        events = resp.events()
        assert await events.__anext__()                 # it is generating
        await events.aclose()
        await resp.aclose()                             # the client left: a cancel frame goes out
        deadline = time.monotonic() + 30
        while _abort_count(server.url) < before + 1:    # without the cancel it would end by length
            assert time.monotonic() < deadline, "the cancelled request was not aborted"
            await asyncio.sleep(0.05)
        # the channel serves on after the cancel
        status, raw = await _over_channel(channel, "/v1/completions", {"prompt": [1], "max_tokens": 2})
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 2
    finally:
        channel.close()


async def test_each_request_on_a_channel_is_authorised(server_model, make_server):
    s = make_server(server_model, "--max-num-seqs", "4", api_key="secret")
    try:
        body = msgspec.json.encode({"prompt": [1, 2], "max_tokens": 2})
        for headers, expect in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                ({"Authorization": "Bearer secret"}, 200)):
            channel = _channel(s.url, headers)
            await channel.open()
            try:
                resp = await channel.post("/v1/completions", body)
                assert resp.status == expect, (headers, await resp.read())
                await resp.aclose()
            finally:
                channel.close()
    finally:
        s.stop()


@pytest.mark.parametrize("record", [
    struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",                  # not msgpack
    encode_record([["launch", 1]]),                                   # an unknown frame
    encode_record([["open", "x", "/v1/completions", b"{}"]]),          # an id that is not an int
    struct.pack(">I", 1 << 30),                                       # over the body limit
])
async def test_a_malformed_record_ends_only_its_channel(server, record):
    u = urlsplit(server.url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(f"POST {MUX_PATH} HTTP/1.1\r\nHost: {u.netloc}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                 + b"%x\r\n%b\r\n" % (len(record), record))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)   # the channel's body ends
    assert rest.endswith(b"0\r\n\r\n")
    writer.close()
    assert httpx.post(server.url + "/v1/completions", json={"prompt": [1], "max_tokens": 1},
                      timeout=30).status_code == 200


async def test_a_reply_fails_when_its_channel_drops(server):
    channel = _channel(server.url)
    await channel.open()
    body = {"prompt": [3, 4], "max_tokens": 400, "temperature": 0.0, "ignore_eos": True, "stream": True}
    resp = await channel.post("/v1/completions", msgspec.json.encode(body))
    events = resp.events()
    assert await events.__anext__()
    channel._writer.transport.abort()                    # the connection is gone, as if the replica died
    with pytest.raises(UpstreamError, match="connection closed"):
        async for _ in events:
            pass
    with pytest.raises(UpstreamError):
        await channel.post("/v1/completions", b"{}")
    # the pool opens a new channel for the next request
    up = Upstream()
    try:
        for _ in range(2):
            r = await up.post(server.url, "/v1/completions", msgspec.json.encode({"prompt": [1], "max_tokens": 1}))
            assert r.status == 200 and json.loads(await r.read())["usage"]["completion_tokens"] == 1
            await r.aclose()
        assert len(up.channels) == 1 and not up.no_channel and not up.idle   # no per-request connection
    finally:
        up.close()


async def test_shutdown_ends_the_channel_after_its_requests_get_their_final_event(server_model, make_server):
    """SIGINT drains the requests (each ends with its partial output), then ends the channel: the
    open channel does not hold the server's shutdown until uvicorn's graceful timeout."""
    s = make_server(server_model, "--max-num-seqs", "4", "--shutdown-grace-s", "0.01")
    channel = _channel(s.url)
    await channel.open()
    body = {"prompt": [3, 4], "max_tokens": 400, "temperature": 0.0, "ignore_eos": True, "stream": True}
    resp = await channel.post("/v1/completions", msgspec.json.encode(body))
    events = resp.events()
    got = list(await events.__anext__())
    stopping = asyncio.ensure_future(asyncio.to_thread(s.stop))
    async for batch in events:
        got += batch
    assert json.loads(got[-1])["choices"][0]["finish_reason"] == "abort"
    assert await asyncio.wait_for(stopping, 60) == 0
    with pytest.raises(UpstreamError, match="ended the channel|connection closed"):
        await channel.post("/v1/completions", b"{}")
    assert "graceful shutdown exceeded" not in s.output(), s.output()[-2000:]
    channel.close()
