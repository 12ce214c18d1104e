"""The HTTP API (DESIGN.md §6): OpenAI-compatible completions and chat, RL-native /generate,
the control plane, /health, /metrics. One FastAPI app over one EngineClient. Errors live in
errors.py and SSE plumbing in sse.py; the three API surfaces still share this file (one router
module per surface is issue 11's split, not done yet).

Status codes are listed in tidal/server/errors.py. A streaming response sends its headers only
once the first output is there, so a request that fails before any token still gets a real
status code; a later failure is an SSE `error` event.

Nothing slow runs on the event loop: prompts are checked against cheap bounds (body bytes,
characters, token-id counts) first, large prompts are tokenised in a worker thread, and large
responses are encoded in one, so /health answers while a big request is in work.
"""
from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tidal.config import EngineConfig
from tidal.engine.messages import EngineInvalidInput
from tidal.outputs import CompletionOutput, RequestOutput
from tidal.sampling_params import SamplingParams
from tidal.server import schemas as S
from tidal.server import weight_routes
from tidal.server.engine_client import EngineClient
from tidal.server.errors import APIError, engine_error, error_responses, failure_reason
from tidal.server.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from tidal.server.sse import SSEResponse, event, merge, once, until_disconnect

log = logging.getLogger("tidal.server")
_json = msgspec.json.Encoder().encode
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Server-generated request ids: 128 random bits, in a shape that client-supplied ids may not take.
_SERVER_ID = re.compile(r"(cmpl|chatcmpl|gen)-[0-9a-f]{32}(-\d+)?")
_INLINE_CHARS = 16_384          # prompts up to this many characters are tokenised on the loop
_INLINE_WORK = 50_000           # responses up to this many (token x logprob) entries encoded on it
_PROMPT_FIELDS = ("prompt", "prompt_token_ids")
_SAMPLING_FIELDS = frozenset(SamplingParams.__slots__)
_INFERENCE_ERRORS = error_responses(400, 401, 404, 405, 409, 413, 503, 504)
_CONTROL_ERRORS = error_responses(400, 401, 403, 405, 409, 413, 503, 504)
_JSON_OR_SSE = {200: {"description": "The result (JSON), or server-sent events with stream=true.",
                      "content": {"application/json": {}, "text/event-stream": {}}}}


@dataclass(slots=True)
class ServerSettings:
    served_model_name: str | None = None     # default: the model directory's name
    api_key: str | None = None               # guards inference endpoints
    admin_key: str | None = None             # guards control endpoints (required once any key is set)
    weights_root: str | None = None          # update_weights paths must lie under it
    request_timeout_s: float = 1800.0
    control_timeout_s: float = 60.0
    stuck_after_s: float = 60.0
    heartbeat_timeout_s: float = 5.0         # no heartbeat this long: in-flight requests fail, new get 503
    log_level: str = "INFO"
    host: str = "127.0.0.1"                  # where the server listens: control rules depend on it
    max_body_bytes: int = 32 * 1024 * 1024


class _BodyTooLarge(Exception):
    pass


class _HTTPGate:
    """Outermost ASGI layer: refuses bodies over the limit (413) and counts every answer by
    route and status in tidal_http_requests_total."""

    def __init__(self, app, metrics: ServerMetrics, max_body_bytes: int) -> None:
        self.app, self.metrics, self.limit = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counted(msg) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            length = _content_length(scope)
            if length is not None and length > self.limit:
                await _too_large(self.limit).response()(scope, receive, send_counted)
            else:
                await self.app(scope, self._limited(receive), send_counted)
        finally:
            route = scope.get("route")
            self.metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(status)).inc()

    def _limited(self, receive):
        total = 0

        async def receive_limited():
            nonlocal total
            msg = await receive()
            if msg["type"] == "http.request":
                total += len(msg.get("body", b""))
                if total > self.limit:
                    raise _BodyTooLarge
            return msg
        return receive_limited


def _content_length(scope) -> int | None:
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over {limit} bytes: expected at most {limit} "
                         "(--max-body-bytes)", param="body")


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


class _Track:
    """One request's bookkeeping for /metrics: TTFT, inter-token latency, tokens, and each of
    its samples counted once in tidal_requests_total, however it ends (a client that goes
    away counts as abort)."""
    __slots__ = ("metrics", "t0", "last", "first", "count", "left")

    def __init__(self, metrics: ServerMetrics, samples: int) -> None:
        self.metrics, self.t0 = metrics, time.perf_counter()
        self.last, self.first, self.count, self.left = self.t0, True, 0, samples

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

    def finish(self, reason: str) -> None:
        if self.left > 0:
            self.left -= 1
            self.metrics.on_finish(reason, 0)

    def end(self, reason: str) -> None:
        """Every sample not finished yet ends with `reason`."""
        if self.left > 0:
            self.metrics.on_finish(reason, 0, self.left)
            self.left = 0

    def close(self) -> None:
        self.metrics.on_tokens(self.count)
        self.count = 0


@dataclass(slots=True)
class _Fields:
    """Which body fields carried what on one API surface, to name them in errors."""
    prompt: str                 # prompt | messages | input_ids | text
    prefix: str = ""            # "sampling_params." on /generate

    def param(self, engine_field: str) -> str:
        if engine_field in _PROMPT_FIELDS:
            return self.prompt
        if engine_field in _SAMPLING_FIELDS:
            return self.prefix + engine_field
        return engine_field


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
                  redirect_slashes=False,
                  description="OpenAI-compatible and RL-native generation with a control plane. "
                              "Errors answer {\"error\": {message, type, param, code}}.")
    app.state.server = server
    server.install(app)
    app.openapi = lambda: _openapi_without_422(app)   # bad input answers 400 here, never 422
    app.add_middleware(_HTTPGate, metrics=server.metrics, max_body_bytes=settings.max_body_bytes)
    return app


def _openapi_without_422(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for ops in doc["paths"].values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema


def sampling_params(body: Any, max_tokens: int, logprobs: int | None, prefix: str = "") -> SamplingParams:
    """The one place a request body becomes SamplingParams (both OpenAI surfaces and /generate).
    The schema has bounded each field; what it cannot see (one field against another) is here."""
    if body.min_tokens > max_tokens:
        raise APIError.invalid(prefix + "min_tokens", body.min_tokens, f"an integer <= max_tokens={max_tokens}")
    return SamplingParams(
        n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        seed=body.seed, max_tokens=max_tokens, min_tokens=body.min_tokens, stop=_stops(body.stop),
        stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos, logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens, logprobs_mode=body.logprobs_mode)


class _Server:
    def __init__(self, engine_config: EngineConfig, settings: ServerSettings) -> None:
        self.engine_config = engine_config
        self.settings = settings
        self.model_name = settings.served_model_name or _default_name(engine_config.model)
        self.metrics = ServerMetrics(self.model_name)
        self.client: EngineClient | None = None
        self.token_text: _TokenText | None = None
        self.max_prompt_chars = 0
        self.created = int(time.time())

    async def start(self) -> None:
        s = self.settings
        self._warn_about_control()
        self.client = EngineClient(self.engine_config, request_timeout_s=s.request_timeout_s,
                                   control_timeout_s=s.control_timeout_s, stuck_after_s=s.stuck_after_s,
                                   heartbeat_timeout_s=s.heartbeat_timeout_s,
                                   log_level=s.log_level, metrics=self.metrics)
        await self.client.start()
        self.token_text = _TokenText(self.client.tokenizer)
        longest = await asyncio.to_thread(_longest_token_chars, self.client.tokenizer)
        # A token never stands for more characters than its vocabulary entry has (x4 leaves room
        # for normalisers that fold several characters into one): anything longer cannot fit.
        self.max_prompt_chars = self.client.max_model_len * longest * 4
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
    def _control_refused(self) -> bool:
        s = self.settings
        return s.admin_key is None and (s.api_key is not None or s.host not in _LOOPBACK)

    def _warn_about_control(self) -> None:
        if self._control_refused():
            log.warning("control endpoints (pause, abort, sleep, update_weights, ...) are disabled: "
                        "set --admin-key to use them (required with --api-key or beyond loopback)")
        elif self.settings.admin_key is None:
            log.warning("control endpoints are unguarded: anyone who can reach %s can pause, abort "
                        "and replace the weights; set --admin-key", self.settings.host)

    @staticmethod
    def _check_key(request: Request, key: str, what: str) -> None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, f"{what}: expected 'Authorization: Bearer <key>'",
                           "authentication_error", headers={"WWW-Authenticate": "Bearer"})

    # async: a plain-def dependency would cost every request a trip through the thread pool.
    async def require_api_key(self, request: Request) -> None:
        if self.settings.api_key is not None:
            self._check_key(request, self.settings.api_key, "invalid or missing API key")

    async def require_admin_key(self, request: Request) -> None:
        if self.settings.admin_key is not None:
            self._check_key(request, self.settings.admin_key,
                            "an admin key is required for control endpoints (--admin-key); it is missing or wrong")
        elif self._control_refused():
            raise APIError(403, "control endpoints require an admin key, and this server was started without "
                                "--admin-key (required when --api-key is set or the server listens beyond "
                                "loopback)", "permission_error")

    # -- routes --------------------------------------------------------------------------
    def install(self, app: FastAPI) -> None:
        user = [Depends(self.require_api_key)]
        admin = [Depends(self.require_admin_key)]
        self._install_errors(app)
        inference = dict(dependencies=user, responses={**_JSON_OR_SSE, **_INFERENCE_ERRORS})
        app.post("/v1/completions", **inference)(self.completions)
        app.post("/v1/chat/completions", **inference)(self.chat_completions)
        app.post("/generate", **inference)(self.generate)
        app.get("/v1/models", dependencies=user, responses=error_responses(401, 405))(self.models)
        control = dict(dependencies=admin, responses=_CONTROL_ERRORS)
        app.post("/v1/pause", **control)(self.pause)
        app.post("/v1/resume", **control)(self.resume)
        app.get("/v1/is_paused", **control)(self.is_paused)
        app.post("/v1/abort_requests", **control)(self.abort_requests)
        app.post("/v1/sleep", **control)(self.sleep)
        app.post("/v1/wake_up", **control)(self.wake_up)
        app.post("/v1/update_weights", **control)(self.update_weights)
        app.post("/v1/flush_cache", **control)(self.flush_cache)
        app.get("/v1/state", **control)(self.state)
        weight_routes.register(app, self)
        # ops; HEAD for load balancers
        app.get("/health", responses=error_responses(503), operation_id="health")(self.health)
        app.head("/health", responses=error_responses(503), operation_id="health_head")(self.health)
        app.get("/metrics", responses={200: {"description": "Prometheus text format.",
                                             "content": {"text/plain": {}}}})(self.metrics_endpoint)

    def _install_errors(self, app: FastAPI) -> None:
        @app.exception_handler(APIError)
        async def _api_error(request: Request, e: APIError):
            return e.response()

        @app.exception_handler(RequestValidationError)
        async def _validation_error(request: Request, e: RequestValidationError):
            return _validation_api_error(e.errors()).response()

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: Request, e: StarletteHTTPException):
            return _http_api_error(request, e).response()

        @app.exception_handler(Exception)
        async def _internal_error(request: Request, e: Exception):
            return engine_error(e).response()

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

    def _check_openai_extras(self, body: S._SamplingFields) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name}={getattr(body, name)} is not supported: expected 0", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported: expected null or {}", param="logit_bias")

    def _precheck(self, prompts: list, field: str) -> None:
        """Bounds that need no tokeniser: they stop a huge prompt before any work on it."""
        limit = self.engine.max_model_len
        for p in prompts:
            if isinstance(p, str) and self.max_prompt_chars and len(p) > self.max_prompt_chars:
                raise APIError(400, f"{field} is {len(p)} characters: expected at most {self.max_prompt_chars} "
                                    f"(it cannot fit in max_model_len={limit} tokens)", param=field)
            if isinstance(p, list) and len(p) >= limit:
                raise APIError(400, f"{field} has {len(p)} token ids: expected fewer than "
                                    f"max_model_len={limit}", param=field)

    async def _prepare(self, prompts: list, params: SamplingParams,
                       fields: _Fields) -> list[tuple[str | None, list[int]]]:
        """Token ids of each prompt; large ones are tokenised off the event loop."""
        self._precheck(prompts, fields.prompt)
        chars = sum(len(p) for p in prompts if isinstance(p, str))
        if chars > _INLINE_CHARS:
            return await asyncio.to_thread(self._prepare_now, prompts, params, fields)
        return self._prepare_now(prompts, params, fields)

    def _prepare_now(self, prompts: list, params: SamplingParams, fields: _Fields) -> list:
        engine = self.engine
        try:
            return [engine.process_prompt(p, params) for p in prompts]
        except EngineInvalidInput as e:
            raise engine_error(e, fields.param) from None
        except ValueError as e:   # InputProcessor's checks are all about the prompt
            raise APIError(400, str(e), param=fields.prompt) from None
        except Exception as e:
            raise engine_error(e) from None

    def _request_id(self, given: str | None, prefix: str) -> str:
        if given is None:
            return f"{prefix}-{secrets.token_hex(16)}"
        if _SERVER_ID.fullmatch(given):
            raise APIError.invalid("request_id", given, "an id not of the form <cmpl|chatcmpl|gen>-<32 hex "
                                   "digits>, which is reserved for ids the server generates")
        return given

    def _start(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams, rid: str,
               stream: bool, timeout_s: float | None = None) -> list[AsyncIterator[RequestOutput]]:
        ids = [rid] if len(prompts) == 1 else [f"{rid}-{i}" for i in range(len(prompts))]
        return [self.engine.generate(text, params, request_id=r, stream=stream, delta=stream,
                                     timeout_s=timeout_s, prompt_token_ids=toks)
                for r, (text, toks) in zip(ids, prompts)]

    def _generation_error(self, e: BaseException, rid: str, fields: _Fields, timeout_s: float | None) -> APIError:
        if isinstance(e, ValueError) and not isinstance(e, EngineInvalidInput):
            # Given token ids, the one input check EngineClient.generate makes is the id's uniqueness.
            return APIError(400, str(e), param="request_id")
        timeout = self.settings.request_timeout_s if timeout_s is None else timeout_s
        deadline = f"request {rid} did not finish within its deadline of {timeout:g}s (timeout_s)"
        return engine_error(e, fields.param, deadline)

    async def _collect(self, gens: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * len(gens)
        async for i, out in merge(gens):
            finals[i] = out
        return finals  # type: ignore[return-value]

    def _account(self, outs: list[RequestOutput]) -> None:
        for o in outs:
            for c in o.outputs:
                self.metrics.on_finish(c.finish_reason or "abort", 0)
                self.metrics.on_tokens(len(c.token_ids))
            self.metrics.prompt_tokens.labels(self.model_name).inc(len(o.prompt_token_ids))

    async def _run_collect(self, request: Request, gens, rid: str, fields: _Fields, samples: int,
                           timeout_s: float | None = None) -> list[RequestOutput]:
        inflight = self.metrics.inflight.labels(self.model_name)
        inflight.inc()
        t0 = time.perf_counter()
        try:
            outs = await until_disconnect(request, self._collect(gens))
        except APIError:   # the client went away: its requests were aborted
            self.metrics.on_finish("abort", 0, samples)
            raise
        except Exception as e:
            self.metrics.on_finish(failure_reason(e), 0, samples)
            raise self._generation_error(e, rid, fields, timeout_s) from None
        finally:
            inflight.dec()
        self.metrics.e2e.labels(self.model_name).observe(time.perf_counter() - t0)
        self._account(outs)
        return outs

    async def _respond(self, build: Callable[[], Any], work: int) -> Response:
        """JSON of `build()`; a large one is built and encoded in a worker thread."""
        if work <= _INLINE_WORK:
            return Response(_json(build()), media_type="application/json")
        data = await asyncio.to_thread(lambda: _json(build()))
        return Response(data, media_type="application/json")

    async def _sse(self, request: Request, events: AsyncIterator[bytes], track: _Track, rid: str,
                   fields: _Fields, timeout_s: float | None = None) -> Response:
        """Wait for the first event before sending headers, so early failures get a status."""
        inflight = self.metrics.inflight.labels(self.model_name)
        inflight.inc()
        try:
            first = await until_disconnect(request, events.__anext__())
        except StopAsyncIteration:
            inflight.dec()
            return SSEResponse(once(b"data: [DONE]\n\n"))
        except BaseException as e:
            inflight.dec()
            await _aclose(events)
            if isinstance(e, (APIError, asyncio.CancelledError)):   # the client or the server went away
                track.end("abort")
                raise
            track.end(failure_reason(e))
            raise self._generation_error(e, rid, fields, timeout_s) from None

        async def body() -> AsyncIterator[bytes]:
            try:
                yield first
                async for ev in events:
                    yield ev
            except Exception as e:  # after the headers: tell the client in-band
                track.end(failure_reason(e))
                err = self._generation_error(e, rid, fields, timeout_s)
                yield event(err.body())
                yield b"data: [DONE]\n\n"
            finally:
                track.end("abort")   # still unfinished here: the client went away
                inflight.dec()
                self.metrics.e2e.labels(self.model_name).observe(time.perf_counter() - track.t0)
                await _aclose(events)

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
        self._check_openai_extras(body)
        params = sampling_params(body, body.max_tokens or 16, body.logprobs)
        p = body.prompt
        prompts: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        fields = _Fields("prompt")
        prepared = await self._prepare(prompts, params, fields)
        rid = self._request_id(body.request_id, "cmpl")
        gens = self._start(prepared, params, rid, body.stream)
        track = _Track(self.metrics, len(prepared) * params.n)
        if body.stream:
            return await self._sse(request, self._completion_events(body, rid, prepared, gens, track),
                                   track, rid, fields)
        outs = await self._run_collect(request, gens, rid, fields, track.left)

        def build() -> dict:
            choices = []
            for i, o in enumerate(outs):
                for c in o.outputs:
                    choice = {"index": i * body.n + c.index, "text": c.text,
                              "logprobs": self._completion_logprobs(c, 0) if body.logprobs is not None else None,
                              "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                    if body.return_token_ids:
                        choice.update(token_ids=c.token_ids, prompt_token_ids=o.prompt_token_ids,
                                      weight_version=c.weight_version,
                                      weight_spans=[[s.version, s.start, s.end] for s in c.weight_spans])
                    choices.append(choice)
            return {"id": rid, "object": "text_completion", "created": int(time.time()),
                    "model": self.model_name, "choices": choices, "usage": _usage(outs)}
        return await self._respond(build, _work(outs, body.logprobs))

    def _completion_logprobs(self, c: CompletionOutput, offset0: int) -> dict:
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

    async def _completion_events(self, body: S.CompletionRequest, rid: str, prepared, gens,
                                 track: _Track) -> AsyncIterator[bytes]:
        created, n = int(time.time()), body.n
        offsets: dict[int, int] = {}
        totals: dict[tuple[int, int], int] = {}
        async for i, out in merge(gens, track):
            track.tokens(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                if not c.token_ids and not c.text and c.finish_reason is None:
                    continue
                idx = i * n + c.index
                totals[(i, c.index)] = totals.get((i, c.index), 0) + len(c.token_ids)
                choice: dict[str, Any] = {"index": idx, "text": c.text, "logprobs": None,
                                          "finish_reason": c.finish_reason}
                if body.logprobs is not None:
                    choice["logprobs"] = self._completion_logprobs(c, offsets.get(idx, 0))
                    offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in choice["logprobs"]["tokens"])
                if c.finish_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                    track.finish(c.finish_reason)
                if body.return_token_ids:
                    choice["token_ids"] = c.token_ids
                    choice["weight_version"] = c.weight_version
                    if c.finish_reason is not None:
                        choice["weight_spans"] = [[s.version, s.start, s.end] for s in c.weight_spans]
                yield event({"id": rid, "object": "text_completion", "created": created,
                             "model": self.model_name, "choices": [choice]})
        prompt_tokens = sum(len(t) for _, t in prepared)
        self.metrics.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        if body.stream_options is not None and body.stream_options.include_usage:
            comp = sum(totals.values())
            yield event({"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                         "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": comp,
                                                  "total_tokens": prompt_tokens + comp}})
        yield b"data: [DONE]\n\n"

    # -- /v1/chat/completions ------------------------------------------------------------
    async def chat_completions(self, body: S.ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        self._check_openai_extras(body)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        ids = await self._chat_prompt(body)
        limit = self.engine.max_model_len
        if len(ids) >= limit:
            raise APIError(400, f"messages are {len(ids)} tokens after the chat template: expected fewer "
                                f"than max_model_len={limit}", param="messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or (limit - len(ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens, logprobs)
        fields = _Fields("messages")
        prepared = await self._prepare([ids], params, fields)
        rid = self._request_id(body.request_id, "chatcmpl")
        gens = self._start(prepared, params, rid, body.stream)
        track = _Track(self.metrics, params.n)
        if body.stream:
            return await self._sse(request, self._chat_events(body, rid, prepared, gens, track), track, rid, fields)
        outs = await self._run_collect(request, gens, rid, fields, track.left)

        def build() -> dict:
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
            return resp
        return await self._respond(build, _work(outs, logprobs))

    async def _chat_prompt(self, body: S.ChatCompletionRequest) -> list[int]:
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
        chars = sum(len(m["content"]) for m in messages)
        if self.max_prompt_chars and chars > self.max_prompt_chars:
            raise APIError(400, f"messages are {chars} characters: expected at most {self.max_prompt_chars} "
                                f"(they cannot fit in max_model_len={self.engine.max_model_len} tokens)",
                           param="messages")

        def render() -> list[int]:
            try:
                text = tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=body.add_generation_prompt)
                return list(tok.encode(text, add_special_tokens=False))
            except Exception as e:  # a template may reject roles or orderings
                raise APIError(400, f"messages could not be rendered with the chat template: {e}",
                               param="messages") from None
        return await asyncio.to_thread(render) if chars > _INLINE_CHARS else render()

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

    async def _chat_events(self, body: S.ChatCompletionRequest, rid: str, prepared, gens,
                           track: _Track) -> AsyncIterator[bytes]:
        created = int(time.time())
        started: set[int] = set()
        total = 0
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        async for _, out in merge(gens, track):
            track.tokens(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                if c.index not in started:
                    started.add(c.index)
                    yield event({**base, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
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
                    track.finish(c.finish_reason)
                if body.return_token_ids:
                    choice["token_ids"] = c.token_ids
                    choice["weight_version"] = c.weight_version
                    if c.finish_reason is not None:
                        choice["weight_spans"] = [[s.version, s.start, s.end] for s in c.weight_spans]
                yield event({**base, "choices": [choice]})
        prompt_tokens = len(prepared[0][1])
        self.metrics.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield event({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": total,
                                                          "total_tokens": prompt_tokens + total}})
        yield b"data: [DONE]\n\n"

    # -- /generate -----------------------------------------------------------------------
    async def generate(self, body: S.GenerateRequest, request: Request) -> Response:
        if (body.input_ids is None) == (body.text is None):
            raise APIError(400, "give exactly one of input_ids or text", param="input_ids")
        sp = body.sampling_params
        logprobs = sp.logprobs if sp.logprobs is not None else (0 if body.return_logprob else None)
        params = sampling_params(sp, sp.max_tokens, logprobs, prefix="sampling_params.")
        fields = _Fields("input_ids" if body.input_ids is not None else "text", "sampling_params.")
        prompt = body.input_ids if body.input_ids is not None else body.text
        prepared = await self._prepare([prompt], params, fields)
        rid = self._request_id(body.request_id, "gen")
        gens = self._start(prepared, params, rid, body.stream, body.timeout_s)
        track = _Track(self.metrics, params.n)
        if body.stream:
            return await self._sse(request, self._generate_events(rid, prepared, gens, track), track, rid,
                                   fields, body.timeout_s)
        o = (await self._run_collect(request, gens, rid, fields, track.left, body.timeout_s))[0]

        def build() -> Any:
            samples = [self._generate_sample(rid, c, len(o.prompt_token_ids), final=True) for c in o.outputs]
            return samples[0] if len(samples) == 1 else samples
        return await self._respond(build, _work([o], logprobs))

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

    async def _generate_events(self, rid: str, prepared, gens, track: _Track) -> AsyncIterator[bytes]:
        counts: dict[int, int] = {}
        prompt_tokens = len(prepared[0][1])
        async for _, out in merge(gens, track):
            track.tokens(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                if not c.token_ids and not c.text and c.finish_reason is None:
                    continue
                counts[c.index] = counts.get(c.index, 0) + len(c.token_ids)
                if c.finish_reason is not None:
                    track.finish(c.finish_reason)
                yield event(self._generate_sample(rid, c, prompt_tokens, final=False,
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
        except Exception as e:
            raise engine_error(e) from None

    async def pause(self, body: S.PauseRequest | None = None,
                    mode: Literal["abort", "retract", "keep", "drain"] | None = Query(
                        None, description="the same as the body's mode (vLLM's form); not both"),
                    timeout_s: float | None = Query(None, ge=0.0, le=7 * 86400,
                                                    description="the same as the body's timeout_s; not both")
                    ) -> Response:
        if mode is not None or timeout_s is not None:
            if body is not None:
                raise APIError(400, "pause options were given both in the query and in the body: expected "
                                    "one of them", param="mode" if mode is not None else "timeout_s")
            body = S.PauseRequest(mode=mode or "abort", timeout_s=timeout_s)
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


# -- request errors FastAPI raises before a route runs ---------------------------------------
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param_of_loc(loc: tuple) -> str:
    """The field a pydantic error location names, without union-member tags (`prompt.str`)."""
    parts: list[str] = []
    for x in loc:
        if x in ("body", "query") and not parts:
            continue
        if isinstance(x, str) and (x in _TYPE_TAGS or "[" in x or "-" in x):
            break
        parts.append(str(x))
    return ".".join(parts) or "body"


def _validation_api_error(errs: list[dict]) -> APIError:
    if len(errs) == 1 and errs[0].get("type") == "json_invalid":
        pos = errs[0]["loc"][-1]
        reason = (errs[0].get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"the request body is not valid JSON: {reason} (at character {pos})", param="body")
    if len(errs) == 1 and tuple(errs[0].get("loc", ())) == ("body",) and isinstance(errs[0].get("input"), bytes):
        return APIError(400, "the request body must be a JSON object (send 'Content-Type: application/json')",
                        param="body")
    parts, param = [], None
    for err in errs[:5]:
        field = _param_of_loc(tuple(err.get("loc", ())))
        param = param or field
        got = err.get("input")
        got_s = "" if isinstance(got, (dict, list)) or got is None else f" (got {str(got)[:80]!r})"
        parts.append(f"{field}: {err.get('msg')}{got_s}")
    return APIError(400, "; ".join(parts) or "invalid request", param=param)


def _http_api_error(request: Request, e: StarletteHTTPException) -> APIError:
    cause = e.__cause__
    if isinstance(cause, _BodyTooLarge):
        return _too_large(request.app.state.server.settings.max_body_bytes)
    if isinstance(cause, UnicodeDecodeError):
        return APIError(400, f"the request body is not valid UTF-8: {cause.reason} at byte {cause.start}: "
                             "expected UTF-8 JSON", param="body")
    if isinstance(cause, RecursionError):
        return APIError(400, "the request body nests too deeply: expected JSON nested less than about "
                             "1,000 levels", param="body")
    if e.status_code == 404:
        return APIError(404, f"no route {request.method} {request.url.path}: see /docs for the routes",
                        "not_found_error")
    if e.status_code == 405:
        return APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                        headers=getattr(e, "headers", None))
    return APIError(e.status_code, str(e.detail), headers=getattr(e, "headers", None))


# -- small helpers ------------------------------------------------------------------------------
async def _aclose(gen) -> None:
    try:
        await gen.aclose()
    except Exception:
        pass


def _json_response(obj: Any, status: int = 200) -> Response:
    return Response(_json(obj), status, media_type="application/json")


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    comp = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp}


def _work(outs: list[RequestOutput], logprobs: int | None) -> int:
    """How many entries a response will hold: tokens, times the top-logprobs per token."""
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return tokens * (1 + (logprobs or 0))


def _longest_token_chars(tokenizer) -> int:
    if tokenizer is None:
        return 1
    try:
        vocab = tokenizer.get_vocab()
    except Exception:   # no vocabulary to read: assume long tokens rather than reject real prompts
        return 256
    return max((len(t) for t in vocab), default=1)


def _default_name(model: str | None) -> str:
    if model is None:
        return "tidal-default"
    return os.path.basename(os.path.normpath(model)) or model
