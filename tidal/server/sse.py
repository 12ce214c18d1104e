"""Server-sent events: the response class that cancels its stream when the client goes away,
the merge of several requests' outputs into one stream, and the event encoding."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import StreamingResponse

from tidal.outputs import RequestOutput
from tidal.server.errors import APIError

log = logging.getLogger("tidal.server")
_json = msgspec.json.Encoder().encode

# Characters that str.splitlines-based SSE readers (httpx's aiter_lines among them) treat as line
# breaks; inside an event they would split its JSON. Escaped, the JSON means the same.
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def _escape_line_breaks(data: bytes) -> bytes:
    for raw, escaped in _LINE_BREAKS:
        data = data.replace(raw, escaped)
    return data


class SSEResponse(StreamingResponse):
    """SSE that always watches for the client going away (and then cancels the stream, which
    aborts its requests in the engine), and always closes the body iterator."""

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stream, watch):
                t.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
            if isinstance(self.body_iterator, AsyncGenerator):
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()
        if stream.done() and not stream.cancelled() and stream.exception() is not None:
            exc = stream.exception()
            if not isinstance(exc, OSError):
                log.error("streaming response failed: %r", exc)


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; if the client disconnects first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watch.cancel()
    if task.cancelled():
        raise APIError(499, "client disconnected", "client_closed_request")
    return task.result()


async def merge(
    gens: list[AsyncGenerator[RequestOutput, None]], timing: Any = None
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Outputs of several requests as they come, tagged with the request's position. One
    request (the common case) is iterated in place: no task, no queue, no extra generator."""
    try:
        if len(gens) == 1:
            async with contextlib.aclosing(gens[0]) as g:
                async for out in g:
                    yield 0, out
        else:
            async with contextlib.aclosing(_merge_many(gens)) as it:
                async for item in it:
                    yield item
    finally:
        if timing is not None:
            timing.close()


async def _merge_many(
    gens: list[AsyncGenerator[RequestOutput, None]],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async with contextlib.aclosing(gen) as g:
                async for out in g:
                    q.put_nowait((i, out, None))
            q.put_nowait((i, None, None))
        except Exception as e:
            q.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            i, out, err = await q.get()
            if err is not None:
                raise err
            if out is None:
                left -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def event(obj: Any) -> bytes:
    return b"data: " + _escape_line_breaks(_json(obj)) + b"\n\n"


async def once(item: bytes) -> AsyncIterator[bytes]:
    yield item
