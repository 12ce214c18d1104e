"""The HTTP API (DESIGN.md §6): OpenAI-compatible completions and chat, RL-native /generate,
the control plane, /health, /metrics. One FastAPI app over one EngineClient.

Status codes: 400 bad input (the message names the field), 401 missing/wrong key, 403 a weights
path outside --weights-root, 404 unknown model, 409 the engine refused a control op in its
current state, 503 rejected while paused (--reject-while-paused) or engine dead, 504 deadline.
A streaming response sends its headers only once the first output is there, so a request that
fails before any token still gets a real status code; a later failure is an SSE `error` event.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import msgspec
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tidal.config import EngineConfig
from tidal.engine.client import ControlTimeout
from tidal.engine.messages import EngineDead, EngineError, EngineNotServing
from tidal.outputs import CompletionOutput, RequestOutput
from tidal.sampling_params import SamplingParams
from tidal.server import weight_routes
from tidal.server import schemas as S
from tidal.server.engine_client import EngineClient, RequestTimeout
from tidal.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics

log = logging.getLogger("tidal.server")
_json = msgspec.json.Encoder().encode
# Characters that str.splitlines-based SSE readers (httpx's aiter_lines among them) treat as line
# breaks; inside an event they would split its JSON. Escaped, the JSON means the same.
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def _escape_line_breaks(data: bytes) -> bytes:
    for raw, escaped in _LINE_BREAKS:
        data = data.replace(raw, escaped)
    return data


@dataclass(slots=True)
class ServerSettings:
    served_model_name: str | None = None     # default: the model directory's name
    api_key: str | None = None               # guards inference endpoints
    admin_key: str | None = None             # guards control endpoints (default: api_key)
    weights_root: str | None = None          # update_weights paths must lie under it
    request_timeout_s: float = 1800.0
    control_timeout_s: float = 60.0
    stuck_after_s: float = 60.0
    log_level: str = "INFO"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def _error_body(status: int, message: str, type_: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def _error_response(e: APIError) -> Response:
    return Response(_json(_error_body(e.status, e.message, e.type, e.param)), e.status,
                    media_type="application/json", headers=e.headers)


def _engine_error(e: BaseException) -> APIError:
    """Map what the engine raised to an HTTP error."""
    if isinstance(e, EngineNotServing):
        return APIError(503, f"{e}; retry after resume", "engine_not_serving", headers={"Retry-After": "1"})
    if isinstance(e, EngineDead):
        return APIError(503 if "shut down" in str(e) else 500, str(e), "engine_dead")
    if isinstance(e, (RequestTimeout, ControlTimeout)):
        return APIError(504, str(e), "timeout")
    if isinstance(e, ValueError):
        return APIError(400, str(e), "invalid_request_error", _param_of(str(e)))
    if isinstance(e, EngineError):
        return APIError(409, str(e), "engine_error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")


def _param_of(message: str) -> str | None:
    for name in ("prompt", "max_tokens", "request_id", "messages", "input_ids"):
        if name in message:
            return name
    return None


def _json_response(obj: Any, status: int = 200) -> Response:
    return Response(_json(obj), status, media_type="application/json")


class SSEResponse(StreamingResponse):
    """SSE that always watches for the client going away (and then cancels the stream, which
    aborts its requests in the engine), and always closes the body iterator."""

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stream, watch):
                t.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
        if stream.done() and not stream.cancelled() and stream.exception() is not None:
            exc = stream.exception()
            if not isinstance(exc, OSError):
                log.error("streaming response failed: %r", exc)


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
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


async def _merge(gens: list[AsyncIterator[RequestOutput]],
                 timing: "_Timing | None" = None) -> AsyncIterator[tuple[int, RequestOutput]]:
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


async def _merge_many(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
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


class _TokenText:
    """Per-token strings for logprobs, decoded once per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, tid: int) -> str:
        s = self.cache.get(tid)
        if s is None:
            s = self.tokenizer.decode([tid]) if self.tokenizer is not None else f"<{tid}>"
            if len(self.cache) < 1_000_000:
                self.cache[tid] = s
        return s


class _Timing:
    """TTFT and inter-token latency of one streamed request, for /metrics; the token count
    goes to the counter once, at the end."""
    __slots__ = ("metrics", "t0", "last", "first", "count")

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics, self.t0 = metrics, time.perf_counter()
        self.last, self.first, self.count = self.t0, True, 0

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.first:
            self.metrics.on_first_token(now - self.t0)
            self.first = False
        else:
            self.metrics.on_inter_token(now - self.last, n)
        self.last = now
        self.count += n

    def close(self) -> None:
        self.metrics.on_tokens(self.count)
        self.count = 0


def create_app(engine_config: EngineConfig, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    server = _Server(engine_config, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="Tidal", version="0.1.0", lifespan=lifespan, strict_content_type=False,
                  description="OpenAI-compatible and RL-native generation with a control plane.")
    app.state.server = server
    server.install(app)
    return app


class _Server:
    def __init__(self, engine_config: EngineConfig, settings: ServerSettings) -> None:
        self.engine_config = engine_config
        self.settings = settings
        self.model_name = settings.served_model_name or _default_name(engine_config.model)
        self.metrics = ServerMetrics(self.model_name)
        self.client: EngineClient | None = None
        self.token_text: _TokenText | None = None
        self.created = int(time.time())

    async def start(self) -> None:
        s = self.settings
        self.client = EngineClient(self.engine_config, request_timeout_s=s.request_timeout_s,
                                   control_timeout_s=s.control_timeout_s, stuck_after_s=s.stuck_after_s,
                                   log_level=s.log_level, metrics=self.metrics)
        await self.client.start()
        self.token_text = _TokenText(self.client.tokenizer)
        # Everything loaded so far (torch, transformers, the tokenizer) lives for good: keep it
        # out of the collector's sight, so that the collections that streaming triggers (it
        # allocates per token) do not walk it over and over.
        gc.freeze()
        log.info("engine core ready (pid %s): %s, max_model_len=%d", self.client.engine_pid,
                 self.client.model_path, self.client.max_model_len)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.shutdown()

    # -- auth ----------------------------------------------------------------------------
    def _check_key(self, request: Request, key: str | None) -> None:
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "invalid or missing API key: expected 'Authorization: Bearer <key>'",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})

    # async: a plain-def dependency would cost every request a trip through the thread pool.
    async def require_api_key(self, request: Request) -> None:
        self._check_key(request, self.settings.api_key)

    async def require_admin_key(self, request: Request) -> None:
        self._check_key(request, self.settings.admin_key or self.settings.api_key)

    # -- routes --------------------------------------------------------------------------
    def install(self, app: FastAPI) -> None:
        user = [Depends(self.require_api_key)]
        admin = [Depends(self.require_admin_key)]

        @app.exception_handler(APIError)
        async def _api_error(request: Request, e: APIError):
            return _error_response(e)

        @app.exception_handler(RequestValidationError)
        async def _validation_error(request: Request, e: RequestValidationError):
            errs = e.errors()
            if len(errs) == 1 and tuple(errs[0].get("loc", ())) == ("body",) and isinstance(errs[0].get("input"), bytes):
                return _error_response(APIError(400, "the request body must be a JSON object (send "
                                                     "'Content-Type: application/json')", param="body"))
            parts, param = [], None
            for err in errs[:5]:
                loc = [str(x) for x in err.get("loc", ()) if x != "body"]
                field = ".".join(loc) or "body"
                param = param or field
                got = err.get("input")
                got_s = "" if isinstance(got, (dict, list)) or got is None else f" (got {str(got)[:80]!r})"
                parts.append(f"{field}: {err.get('msg')}{got_s}")
            return _error_response(APIError(400, "; ".join(parts) or "invalid request", param=param))

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, e: StarletteHTTPException):
            return _error_response(APIError(e.status_code, str(e.detail), "invalid_request_error",
                                            headers=getattr(e, "headers", None)))

        @app.exception_handler(Exception)
        async def _internal_error(request: Request, e: Exception):
            log.exception("unhandled error on %s", request.url.path)
            return _error_response(_engine_error(e))

        # inference
        app.post("/v1/completions", dependencies=user)(self.completions)
        app.post("/v1/chat/completions", dependencies=user)(self.chat_completions)
        app.post("/generate", dependencies=user)(self.generate)
        app.get("/v1/models", dependencies=user)(self.models)
        # control
        app.post("/v1/pause", dependencies=admin)(self.pause)
        app.post("/v1/resume", dependencies=admin)(self.resume)
        app.get("/v1/is_paused", dependencies=admin)(self.is_paused)
        app.post("/v1/abort_requests", dependencies=admin)(self.abort_requests)
        app.post("/v1/sleep", dependencies=admin)(self.sleep)
        app.post("/v1/wake_up", dependencies=admin)(self.wake_up)
        app.post("/v1/update_weights", dependencies=admin)(self.update_weights)
        app.post("/v1/flush_cache", dependencies=admin)(self.flush_cache)
        app.get("/v1/state", dependencies=admin)(self.state)
        weight_routes.register(app, self)
        # ops
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics_endpoint)

    # -- helpers -------------------------------------------------------------------------
    @property
    def engine(self) -> EngineClient:
        if self.client is None:
            raise APIError(503, "engine core is not running", "engine_dead")
        return self.client

    def _check_model(self, model: str | None) -> None:
        if model is None or model == self.model_name:
            return
        if self.client is not None and model == self.client.model_path:
            return
        raise APIError(404, f"model={model!r} does not exist: this server serves {self.model_name!r}",
                       "not_found_error", "model")

    def _params(self, body: S._SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name}={getattr(body, name)} is not supported: expected 0", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported: expected null or {}", param="logit_bias")
        try:
            return SamplingParams(
                n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                min_p=body.min_p, seed=body.seed, max_tokens=max_tokens, min_tokens=body.min_tokens,
                stop=_stops(body.stop), stop_token_ids=list(body.stop_token_ids or []),
                ignore_eos=body.ignore_eos, logprobs=logprobs, skip_special_tokens=body.skip_special_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param=_field_of(str(e))) from None

    def _prepare(self, prompt: str | list[int], params: SamplingParams) -> tuple[str | None, list[int]]:
        try:
            return self.engine.process_prompt(prompt, params)
        except ValueError as e:
            raise APIError(400, str(e), param=_param_of(str(e))) from None
        except EngineError as e:
            raise _engine_error(e) from None

    def _request_id(self, given: str | None, prefix: str) -> str:
        return given or self.engine.new_request_id(prefix)

    def _start(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams, rid: str,
               stream: bool, timeout_s: float | None = None) -> list[AsyncIterator[RequestOutput]]:
        ids = [rid] if len(prompts) == 1 else [f"{rid}-{i}" for i in range(len(prompts))]
        return [self.engine.generate(text, params, request_id=r, stream=stream, delta=stream,
                                     timeout_s=timeout_s, prompt_token_ids=toks)
                for r, (text, toks) in zip(ids, prompts)]

    async def _collect(self, gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(gens)
        async for i, out in _merge(gens):
            finals[i] = out
        return finals  # type: ignore[return-value]

    def _account(self, outs: list[RequestOutput]) -> None:
        for o in outs:
            for c in o.outputs:
                self.metrics.on_finish(c.finish_reason or "abort", 0)
                self.metrics.on_tokens(len(c.token_ids))
            self.metrics.prompt_tokens.labels(self.model_name).inc(len(o.prompt_token_ids))

    async def _run_collect(self, request: Request, gens) -> list[RequestOutput]:
        inflight = self.metrics.inflight.labels(self.model_name)
        inflight.inc()
        t0 = time.perf_counter()
        try:
            outs = await _until_disconnect(request, self._collect(gens))
        except APIError:
            raise
        except Exception as e:
            self.metrics.on_finish(_failure_reason(e), 0)
            raise _engine_error(e) from None
        finally:
            inflight.dec()
        self.metrics.e2e.labels(self.model_name).observe(time.perf_counter() - t0)
        self._account(outs)
        return outs

    async def _sse(self, request: Request, events: AsyncIterator[bytes]) -> Response:
        """Wait for the first event before sending headers, so early failures get a status."""
        inflight = self.metrics.inflight.labels(self.model_name)
        inflight.inc()
        t0 = time.perf_counter()
        try:
            first = await _until_disconnect(request, events.__anext__())
        except StopAsyncIteration:
            inflight.dec()
            first = b"data: [DONE]\n\n"
            return SSEResponse(_once(first))
        except BaseException as e:
            inflight.dec()
            with contextlib.suppress(Exception):
                await events.aclose()
            if isinstance(e, APIError):
                raise
            self.metrics.on_finish(_failure_reason(e), 0)
            raise _engine_error(e) from None

        async def body() -> AsyncIterator[bytes]:
            try:
                yield first
                async for ev in events:
                    yield ev
            except Exception as e:  # after the headers: tell the client in-band
                err = _engine_error(e)
                self.metrics.on_finish(_failure_reason(e), 0)
                yield b"data: " + _json(_error_body(err.status, err.message, err.type)) + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                inflight.dec()
                self.metrics.e2e.labels(self.model_name).observe(time.perf_counter() - t0)
                with contextlib.suppress(Exception):
                    await events.aclose()

        return SSEResponse(body())

    # -- /v1/completions -----------------------------------------------------------------
    async def completions(self, body: S.CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        if body.echo:
            raise APIError(400, "echo=true is not supported: expected false", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported: expected null", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, f"best_of={body.best_of} is not supported: expected null or n={body.n}",
                           param="best_of")
        params = self._params(body, body.max_tokens or 16, body.logprobs)
        p = body.prompt
        prompts: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        prepared = [self._prepare(x, params) for x in prompts]
        rid = self._request_id(body.request_id, "cmpl")
        gens = self._start(prepared, params, rid, body.stream)
        if body.stream:
            return await self._sse(request, self._completion_events(body, rid, prepared, gens))
        outs = await self._run_collect(request, gens)
        choices = []
        for i, o in enumerate(outs):
            for c in o.outputs:
                choice = {"index": i * body.n + c.index, "text": c.text,
                          "logprobs": self._completion_logprobs(c, c.text, 0) if body.logprobs is not None else None,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if body.return_token_ids:
                    choice.update(token_ids=c.token_ids, prompt_token_ids=o.prompt_token_ids,
                                  weight_version=c.weight_version,
                                  weight_spans=[[s.version, s.start, s.end] for s in c.weight_spans])
                choices.append(choice)
        return _json_response({"id": rid, "object": "text_completion", "created": int(time.time()),
                               "model": self.model_name, "choices": choices, "usage": _usage(outs)})

    def _completion_logprobs(self, c: CompletionOutput, text: str, offset0: int) -> dict:
        tt = self.token_text
        toks = [tt(t) for t in c.token_ids]
        offsets, off = [], offset0
        for s in toks:
            offsets.append(off)
            off += len(s)
        top = None
        if c.top_logprobs is not None:
            top = [{tt(t): lp for t, lp in d.items()} for d in c.top_logprobs]
        return {"tokens": toks, "token_logprobs": list(c.logprobs or []), "top_logprobs": top,
                "text_offset": offsets}

    async def _completion_events(self, body: S.CompletionRequest, rid: str, prepared, gens) -> AsyncIterator[bytes]:
        created, n = int(time.time()), body.n
        timing = _Timing(self.metrics)
        offsets: dict[int, int] = {}
        finals: dict[int, RequestOutput] = {}
        totals: dict[tuple[int, int], int] = {}
        async for i, out in _merge(gens, timing):
            timing.tokens(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                if not c.token_ids and not c.text and c.finish_reason is None:
                    continue
                idx = i * n + c.index
                totals[(i, c.index)] = totals.get((i, c.index), 0) + len(c.token_ids)
                choice: dict[str, Any] = {"index": idx, "text": c.text, "logprobs": None,
                                          "finish_reason": c.finish_reason}
                if body.logprobs is not None:
                    choice["logprobs"] = self._completion_logprobs(c, c.text, offsets.get(idx, 0))
                    offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in choice["logprobs"]["tokens"])
                if c.finish_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                    self.metrics.on_finish(c.finish_reason, 0)
                if body.return_token_ids:
                    choice["token_ids"] = c.token_ids
                    choice["weight_version"] = c.weight_version
                    if c.finish_reason is not None:
                        choice["weight_spans"] = [[s.version, s.start, s.end] for s in c.weight_spans]
                yield _event({"id": rid, "object": "text_completion", "created": created,
                              "model": self.model_name, "choices": [choice]})
            if out.finished:
                finals[i] = out
        prompt_tokens = sum(len(t) for _, t in prepared)
        self.metrics.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        if body.stream_options is not None and body.stream_options.include_usage:
            comp = sum(totals.values())
            yield _event({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                          "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": comp,
                                                   "total_tokens": prompt_tokens + comp}})
        yield b"data: [DONE]\n\n"

    # -- /v1/chat/completions ------------------------------------------------------------
    async def chat_completions(self, body: S.ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        ids = self._chat_prompt(body)
        limit = self.engine.max_model_len
        if len(ids) >= limit:
            raise APIError(400, f"messages are {len(ids)} tokens after the chat template: expected fewer "
                                f"than max_model_len={limit}", param="messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or (limit - len(ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        params = self._params(body, max_tokens, logprobs)
        prepared = [self._prepare(ids, params)]
        rid = self._request_id(body.request_id, "chatcmpl")
        gens = self._start(prepared, params, rid, body.stream)
        if body.stream:
            return await self._sse(request, self._chat_events(body, rid, prepared, gens))
        outs = await self._run_collect(request, gens)
        o = outs[0]
        choices = []
        for c in o.outputs:
            choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                      "logprobs": self._chat_logprobs(c) if body.logprobs else None,
                      "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            if body.return_token_ids:
                choice.update(token_ids=c.token_ids, weight_version=c.weight_version,
                              weight_spans=[[s.version, s.start, s.end] for s in c.weight_spans])
            choices.append(choice)
        resp = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": _usage(outs)}
        if body.return_token_ids:
            resp["prompt_token_ids"] = o.prompt_token_ids
        return _json_response(resp)

    def _chat_prompt(self, body: S.ChatCompletionRequest) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(p.text for p in content)
            msg = {"role": m.role, "content": content or ""}
            if m.name:
                msg["name"] = m.name
            messages.append(msg)
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=body.add_generation_prompt)
            return list(tok.encode(text, add_special_tokens=False))
        except Exception as e:  # a template may reject roles or orderings
            raise APIError(400, f"messages could not be rendered with the chat template: {e}",
                           param="messages") from None

    def _chat_logprobs(self, c: CompletionOutput) -> dict:
        tt = self.token_text
        content = []
        for k, (t, lp) in enumerate(zip(c.token_ids, c.logprobs or [])):
            s = tt(t)
            top = []
            if c.top_logprobs is not None and k < len(c.top_logprobs):
                top = [{"token": tt(a), "logprob": b, "bytes": list(tt(a).encode())}
                       for a, b in c.top_logprobs[k].items()]
            content.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": top})
        return {"content": content}

    async def _chat_events(self, body: S.ChatCompletionRequest, rid: str, prepared, gens) -> AsyncIterator[bytes]:
        created = int(time.time())
        timing = _Timing(self.metrics)
        started: set[int] = set()
        total = 0
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        async for _, out in _merge(gens, timing):
            timing.tokens(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                if c.index not in started:
                    started.add(c.index)
                    yield _event({**base, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}]})
                if not c.token_ids and not c.text and c.finish_reason is None:
                    continue
                total += len(c.token_ids)
                delta = {"content": c.text} if (c.text or c.finish_reason is None) else {}
                choice: dict[str, Any] = {"index": c.index, "delta": delta,
                                          "logprobs": self._chat_logprobs(c) if body.logprobs else None,
                                          "finish_reason": c.finish_reason}
                if c.finish_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                    self.metrics.on_finish(c.finish_reason, 0)
                if body.return_token_ids:
                    choice["token_ids"] = c.token_ids
                    choice["weight_version"] = c.weight_version
                    if c.finish_reason is not None:
                        choice["weight_spans"] = [[s.version, s.start, s.end] for s in c.weight_spans]
                yield _event({**base, "choices": [choice]})
        prompt_tokens = len(prepared[0][1])
        self.metrics.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _event({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": total,
                                                           "total_tokens": prompt_tokens + total}})
        yield b"data: [DONE]\n\n"

    # -- /generate -----------------------------------------------------------------------
    async def generate(self, body: S.GenerateRequest, request: Request) -> Response:
        if (body.input_ids is None) == (body.text is None):
            raise APIError(400, "give exactly one of input_ids or text", param="input_ids")
        sp = body.sampling_params
        logprobs = sp.logprobs if sp.logprobs is not None else (0 if body.return_logprob else None)
        try:
            params = SamplingParams(
                n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
                seed=sp.seed, max_tokens=sp.max_tokens, min_tokens=sp.min_tokens, stop=_stops(sp.stop),
                stop_token_ids=list(sp.stop_token_ids or []), ignore_eos=sp.ignore_eos, logprobs=logprobs,
                skip_special_tokens=sp.skip_special_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param="sampling_params." + (_field_of(str(e)) or "")) from None
        prepared = [self._prepare(body.input_ids if body.input_ids is not None else body.text, params)]
        rid = self._request_id(body.request_id, "gen")
        gens = self._start(prepared, params, rid, body.stream, body.timeout_s)
        if body.stream:
            return await self._sse(request, self._generate_events(rid, prepared, gens))
        o = (await self._run_collect(request, gens))[0]
        samples = [self._generate_sample(rid, c, len(o.prompt_token_ids), final=True) for c in o.outputs]
        return _json_response(samples[0] if len(samples) == 1 else samples)

    @staticmethod
    def _generate_sample(rid: str, c: CompletionOutput, prompt_tokens: int, final: bool,
                         completion_tokens: int | None = None) -> dict:
        d = {"request_id": rid, "index": c.index, "output_ids": c.token_ids, "text": c.text,
             "output_logprobs": c.logprobs, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
             "weight_version": c.weight_version, "prompt_tokens": prompt_tokens,
             "completion_tokens": len(c.token_ids) if completion_tokens is None else completion_tokens}
        if c.top_logprobs is not None:
            d["output_top_logprobs"] = [{str(k): v for k, v in t.items()} for t in c.top_logprobs]
        if final or c.finish_reason is not None:
            d["weight_spans"] = [[s.version, s.start, s.end] for s in c.weight_spans]
        return d

    async def _generate_events(self, rid: str, prepared, gens) -> AsyncIterator[bytes]:
        timing = _Timing(self.metrics)
        counts: dict[int, int] = {}
        prompt_tokens = len(prepared[0][1])
        async for _, out in _merge(gens, timing):
            timing.tokens(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                if not c.token_ids and not c.text and c.finish_reason is None:
                    continue
                counts[c.index] = counts.get(c.index, 0) + len(c.token_ids)
                if c.finish_reason is not None:
                    self.metrics.on_finish(c.finish_reason, 0)
                yield _event(self._generate_sample(rid, c, prompt_tokens, final=False,
                                                   completion_tokens=counts[c.index]))
        self.metrics.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        yield b"data: [DONE]\n\n"

    # -- /v1/models, /health, /metrics ---------------------------------------------------
    async def models(self) -> Response:
        c = self.client
        return _json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "tidal",
            "root": c.model_path if c else None, "max_model_len": c.max_model_len if c else None}]})

    async def health(self) -> Response:
        if self.client is None:
            return _json_response({"status": "unhealthy", "reason": "engine core is not running"}, 503)
        h = self.client.health()
        self.metrics.set_health(h.ok)
        body = {"status": "ok" if h.ok else "unhealthy", "reason": h.reason, **h.detail}
        return _json_response(body, 200 if h.ok else 503)

    async def metrics_endpoint(self) -> Response:
        if self.client is not None:
            self.metrics.set_health(self.client.health().ok)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # -- control -------------------------------------------------------------------------
    async def _control(self, call: Callable[[], Awaitable[dict]]) -> Response:
        try:
            return _json_response(await call())
        except APIError:
            raise
        except Exception as e:
            raise _engine_error(e) from None

    async def pause(self, body: S.PauseRequest | None = None) -> Response:
        body = body or S.PauseRequest()
        return await self._control(lambda: self.engine.pause(body.mode, body.timeout_s))

    async def resume(self, body: S.ControlRequest | None = None) -> Response:
        body = body or S.ControlRequest()
        return await self._control(lambda: self.engine.resume(body.timeout_s))

    async def is_paused(self) -> Response:
        async def call() -> dict:
            st = await self.engine.state()
            return {"is_paused": st["state"] != "serving", "state": st["state"], "pause_mode": st.get("pause_mode")}
        return await self._control(call)

    async def abort_requests(self, body: S.AbortRequest) -> Response:
        if body.abort_all == (body.request_ids is not None):
            raise APIError(400, "give exactly one of request_ids or abort_all=true", param="request_ids")
        ids = None if body.abort_all else body.request_ids
        return await self._control(lambda: self.engine.abort(ids, body.timeout_s))

    async def sleep(self, body: S.SleepRequest | None = None) -> Response:
        body = body or S.SleepRequest()
        return await self._control(lambda: self.engine.sleep(body.tags, body.discard, body.timeout_s))

    async def wake_up(self, body: S.WakeUpRequest | None = None) -> Response:
        body = body or S.WakeUpRequest()
        return await self._control(lambda: self.engine.wake_up(body.tags, body.timeout_s))

    async def update_weights(self, body: S.UpdateWeightsRequest) -> Response:
        path = self._weights_path(body.path)
        timeout = body.timeout_s or max(self.settings.control_timeout_s, 600.0)
        return await self._control(lambda: self.engine.update_weights(path, body.version, body.checksums, timeout))

    def _weights_path(self, path: str) -> str:
        if "\x00" in path:
            raise APIError(400, "path contains a NUL byte", param="path")
        real = os.path.realpath(path)
        root = self.settings.weights_root
        if root is not None:
            root = os.path.realpath(root)
            if os.path.commonpath([real, root]) != root:
                raise APIError(403, f"path={path!r} is outside the allowed weights root {root!r} "
                                    "(--weights-root)", "permission_error", "path")
        if not os.path.isdir(real):
            raise APIError(400, f"path={path!r} is not a directory: expected an HF/safetensors checkpoint "
                                "directory", param="path")
        return real

    async def flush_cache(self, body: S.ControlRequest | None = None) -> Response:
        body = body or S.ControlRequest()
        return await self._control(lambda: self.engine.flush_cache(body.timeout_s))

    async def state(self) -> Response:
        return await self._control(lambda: self.engine.state())


def _event(obj: Any) -> bytes:
    return b"data: " + _escape_line_breaks(_json(obj)) + b"\n\n"


async def _once(item: bytes) -> AsyncIterator[bytes]:
    yield item


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _field_of(message: str) -> str | None:
    # SamplingParams errors read "SamplingParams.<field>=... is invalid: ..."
    if message.startswith("SamplingParams."):
        return message[len("SamplingParams."):].split("=", 1)[0]
    return None


def _usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    comp = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp}


def _failure_reason(e: BaseException) -> str:
    if isinstance(e, EngineNotServing):
        return "rejected"
    if isinstance(e, (RequestTimeout, asyncio.TimeoutError)):
        return "timeout"
    return "error"


def _default_name(model: str | None) -> str:
    if model is None:
        return "tidal-default"
    return os.path.basename(os.path.normpath(model)) or model
