"""What every HTTP surface shares: the server's settings and its one EngineClient, auth, prompt
preparation, request starting and collecting, SSE plumbing, metrics bookkeeping, JSON replies.
The routes of each API surface live in their own module (openai_routes, generate_routes,
control_routes, weight_routes) and call into `ServerCore`; api.py assembles the app.

Nothing slow runs on the event loop: prompts are checked against cheap bounds (body bytes,
characters, token-id counts) first, large prompts are tokenised in a worker thread, and large
responses are encoded in one, so /health answers while a big request is in work.

One job past 400 lines: the parts every surface shares (settings, auth, prompt and sampling parsing,
streaming), in one place so they cannot drift apart."""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from fastapi import Request
from fastapi.responses import Response

from tidal.config import EngineConfig
from tidal.engine.messages import EngineInvalidInput
from tidal.outputs import RequestOutput
from tidal.sampling_params import SamplingParams, SamplingParamsError
from tidal.server.engine_client import EngineClient
from tidal.server.errors import APIError, engine_error, error_responses, failure_reason
from tidal.server.metrics import ServerMetrics
from tidal.server.sse import SSEResponse, event, merge, once, until_disconnect

log = logging.getLogger("tidal.server")
_json = msgspec.json.Encoder().encode
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Server-generated request ids: 128 random bits, in a shape that client-supplied ids may not take.
_SERVER_ID = re.compile(r"(cmpl|chatcmpl|gen)-[0-9a-f]{32}(-\d+)?")
INLINE_CHARS = 16_384  # prompts up to this many characters are tokenised on the loop
_INLINE_WORK = 50_000  # responses up to this many (token x logprob) entries encoded on it
_PROMPT_FIELDS = ("prompt", "prompt_token_ids")
_SAMPLING_FIELDS = frozenset(SamplingParams.__slots__)
INFERENCE_ERRORS = error_responses(400, 401, 404, 405, 409, 413, 503, 504)
CONTROL_ERRORS = error_responses(400, 401, 403, 405, 409, 413, 503, 504)
JSON_OR_SSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The result (JSON), or server-sent events with stream=true.",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
}


@dataclass(slots=True)
class ServerSettings:
    served_model_name: str | None = None  # default: the model directory's name
    api_key: str | None = None  # guards inference endpoints
    admin_key: str | None = None  # guards control endpoints (required once any key is set)
    weights_root: str | None = None  # update_weights paths must lie under it
    request_timeout_s: float = 1800.0
    control_timeout_s: float = 60.0
    stuck_after_s: float = 60.0
    heartbeat_timeout_s: float = 5.0  # no heartbeat this long: in-flight requests fail, new get 503
    log_level: str = "INFO"
    host: str = "127.0.0.1"  # where the server listens: control rules depend on it
    max_body_bytes: int = 32 * 1024 * 1024


class TokenText:
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


class Track:
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
class Fields:
    """Which body fields carried what on one API surface, to name them in errors."""

    prompt: str  # prompt | messages | input_ids | text
    prefix: str = ""  # "sampling_params." on /generate

    def param(self, engine_field: str) -> str:
        if engine_field in _PROMPT_FIELDS:
            return self.prompt
        if engine_field in _SAMPLING_FIELDS:
            return self.prefix + engine_field
        return engine_field


def sampling_params(
    body: Any, max_tokens: int, logprobs: int | None, prefix: str = "", prompt_logprobs: int | None = None
) -> SamplingParams:
    """The one place a request body becomes SamplingParams (every surface). The schema has
    bounded each field; what it cannot see (one field against another) is here. Fields a
    surface's schema does not have take SamplingParams' defaults."""
    if body.min_tokens > max_tokens:
        raise APIError.invalid(prefix + "min_tokens", body.min_tokens, f"an integer <= max_tokens={max_tokens}")
    if max_tokens == 0 and body.n > 1:
        raise APIError.invalid(prefix + "n", body.n, "1 when max_tokens=0 (nothing is sampled)")
    try:
        return _build_sampling(body, max_tokens, logprobs, prompt_logprobs)
    except ValueError as e:  # SamplingParams' own checks (e.g. an empty stop string)
        raise sampling_error(e, prefix) from None


def sampling_error(e: ValueError, prefix: str) -> APIError:
    """SamplingParams' own checks as a 400 naming the field (SamplingParamsError carries it), for
    every surface that builds SamplingParams from a body."""
    field = e.field if isinstance(e, SamplingParamsError) else None
    return APIError(400, str(e), param=prefix + field if field else None)


def _build_sampling(body: Any, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        n=body.n,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=body.seed,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        stop=_stops(body.stop),
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens,
        logprobs_mode=body.logprobs_mode,
        repetition_penalty=getattr(body, "repetition_penalty", 1.0),
        presence_penalty=getattr(body, "presence_penalty", 0.0),
        frequency_penalty=getattr(body, "frequency_penalty", 0.0),
        include_stop_str_in_output=getattr(body, "include_stop_str_in_output", False),
        prompt_logprobs=prompt_logprobs,
    )


class ServerCore:
    """The state and plumbing the route modules share (one per server)."""

    def __init__(self, engine_config: EngineConfig, settings: ServerSettings) -> None:
        self.engine_config = engine_config
        self.settings = settings
        self.model_name = settings.served_model_name or _default_name(engine_config.model)
        self.metrics = ServerMetrics(self.model_name)
        self.channels: set = set()  # the routers' channels open now (mux.MuxServer): shutdown ends them
        self.client: EngineClient | None = None
        self.token_text = TokenText(None)  # the tokenizer's, once start() has it
        self.max_prompt_chars = 0
        self.created = int(time.time())

    async def start(self) -> None:
        s = self.settings
        self._warn_about_control()
        self.client = EngineClient(
            self.engine_config,
            request_timeout_s=s.request_timeout_s,
            control_timeout_s=s.control_timeout_s,
            stuck_after_s=s.stuck_after_s,
            heartbeat_timeout_s=s.heartbeat_timeout_s,
            log_level=s.log_level,
            metrics=self.metrics,
        )
        await self.client.start()
        self.token_text = TokenText(self.client.tokenizer)
        longest = await asyncio.to_thread(_longest_token_chars, self.client.tokenizer)
        # A token never stands for more characters than its vocabulary entry has (x4 leaves room
        # for normalisers that fold several characters into one): anything longer cannot fit.
        self.max_prompt_chars = self.client.max_model_len * longest * 4
        # Everything loaded so far (torch, transformers, the tokenizer) lives for good: keep it
        # out of the collector's sight, so that the collections that streaming triggers (it
        # allocates per token) do not walk it over and over.
        gc.freeze()
        log.info(
            "engine core ready (pid %s): %s, max_model_len=%d",
            self.client.engine_pid,
            self.client.model_path,
            self.client.max_model_len,
        )

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.shutdown()

    # -- auth ----------------------------------------------------------------------------
    def _control_refused(self) -> bool:
        s = self.settings
        return s.admin_key is None and (s.api_key is not None or s.host not in _LOOPBACK)

    def _warn_about_control(self) -> None:
        if self._control_refused():
            log.warning(
                "control endpoints (pause, abort, sleep, update_weights, ...) are disabled: "
                "set --admin-key to use them (required with --api-key or beyond loopback)"
            )
        elif self.settings.admin_key is None:
            log.warning(
                "control endpoints are unguarded: anyone who can reach %s can pause, abort "
                "and replace the weights; set --admin-key",
                self.settings.host,
            )

    @staticmethod
    def _check_key(request: Request, key: str, what: str) -> None:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(
                401,
                f"{what}: expected 'Authorization: Bearer <key>'",
                "authentication_error",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # async: a plain-def dependency would cost every request a trip through the thread pool.
    async def require_api_key(self, request: Request) -> None:
        if self.settings.api_key is not None:
            self._check_key(request, self.settings.api_key, "invalid or missing API key")

    async def require_admin_key(self, request: Request) -> None:
        if self.settings.admin_key is not None:
            self._check_key(
                request,
                self.settings.admin_key,
                "an admin key is required for control endpoints (--admin-key); it is missing or wrong",
            )
        elif self._control_refused():
            raise APIError(
                403,
                "control endpoints require an admin key, and this server was started without "
                "--admin-key (required when --api-key is set or the server listens beyond "
                "loopback)",
                "permission_error",
            )

    # -- helpers -------------------------------------------------------------------------
    @property
    def engine(self) -> EngineClient:
        if self.client is None:
            raise APIError(503, "engine core is not running", "engine_dead")
        return self.client

    def check_model(self, model: str | None) -> None:
        if model is None or model == self.model_name:
            return
        if self.client is not None and model == self.client.model_path:
            return
        raise APIError(
            404, f"model={model!r} does not exist: this server serves {self.model_name!r}", "not_found_error", "model"
        )

    def _precheck(self, prompts: list, field: str) -> None:
        """Bounds that need no tokeniser: they stop a huge prompt before any work on it."""
        limit = self.engine.max_model_len
        for p in prompts:
            if isinstance(p, str) and self.max_prompt_chars and len(p) > self.max_prompt_chars:
                raise APIError(
                    400,
                    f"{field} is {len(p)} characters: expected at most {self.max_prompt_chars} "
                    f"(it cannot fit in max_model_len={limit} tokens)",
                    param=field,
                )
            if isinstance(p, list) and len(p) >= limit:
                raise APIError(
                    400, f"{field} has {len(p)} token ids: expected fewer than max_model_len={limit}", param=field
                )

    async def prepare(
        self, prompts: list, params: SamplingParams, fields: Fields
    ) -> list[tuple[str | None, list[int]]]:
        """Token ids of each prompt; large ones are tokenised off the event loop."""
        self._precheck(prompts, fields.prompt)
        chars = sum(len(p) for p in prompts if isinstance(p, str))
        if chars > INLINE_CHARS:
            return await asyncio.to_thread(self._prepare_now, prompts, params, fields)
        return self._prepare_now(prompts, params, fields)

    def _prepare_now(self, prompts: list, params: SamplingParams, fields: Fields) -> list:
        engine = self.engine
        try:
            return [engine.process_prompt(p, params) for p in prompts]
        except EngineInvalidInput as e:
            raise engine_error(e, fields.param) from None
        except ValueError as e:  # InputProcessor's checks are all about the prompt
            raise APIError(400, str(e), param=fields.prompt) from None
        except Exception as e:
            raise engine_error(e) from None

    def request_id(self, given: str | None, prefix: str) -> str:
        if given is None:
            return f"{prefix}-{secrets.token_hex(16)}"
        if _SERVER_ID.fullmatch(given):
            raise APIError.invalid(
                "request_id",
                given,
                "an id not of the form <cmpl|chatcmpl|gen>-<32 hex "
                "digits>, which is reserved for ids the server generates",
            )
        return given

    def start_requests(
        self,
        prompts: list[tuple[str | None, list[int]]],
        params: SamplingParams,
        rid: str,
        stream: bool,
        timeout_s: float | None = None,
    ) -> list[AsyncGenerator[RequestOutput, None]]:
        ids = [rid] if len(prompts) == 1 else [f"{rid}-{i}" for i in range(len(prompts))]
        return [
            self.engine.generate(
                text, params, request_id=r, stream=stream, delta=stream, timeout_s=timeout_s, prompt_token_ids=toks
            )
            for r, (text, toks) in zip(ids, prompts)
        ]

    def _generation_error(self, e: BaseException, rid: str, fields: Fields, timeout_s: float | None) -> APIError:
        if isinstance(e, ValueError) and not isinstance(e, EngineInvalidInput):
            # Given token ids, the one input check EngineClient.generate makes is the id's uniqueness.
            return APIError(400, str(e), param="request_id")
        timeout = self.settings.request_timeout_s if timeout_s is None else timeout_s
        deadline = f"request {rid} did not finish within its deadline of {timeout:g}s (timeout_s)"
        return engine_error(e, fields.param, deadline)

    async def _collect(self, gens: list[AsyncGenerator[RequestOutput, None]]) -> list[RequestOutput]:
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

    async def run_collect(
        self, request: Request, gens, rid: str, fields: Fields, samples: int, timeout_s: float | None = None
    ) -> list[RequestOutput]:
        inflight = self.metrics.inflight.labels(self.model_name)
        inflight.inc()
        t0 = time.perf_counter()
        try:
            outs = await until_disconnect(request, self._collect(gens))
        except APIError:  # the client went away: its requests were aborted
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

    async def respond(self, build: Callable[[], Any], work: int) -> Response:
        """JSON of `build()`; a large one is built and encoded in a worker thread."""
        if work <= _INLINE_WORK:
            return Response(_json(build()), media_type="application/json")
        data = await asyncio.to_thread(lambda: _json(build()))
        return Response(data, media_type="application/json")

    async def sse(
        self,
        request: Request,
        events: AsyncIterator[bytes],
        track: Track,
        rid: str,
        fields: Fields,
        timeout_s: float | None = None,
    ) -> Response:
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
            if isinstance(e, (APIError, asyncio.CancelledError)):  # the client or the server went away
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
                track.end("abort")  # still unfinished here: the client went away
                inflight.dec()
                self.metrics.e2e.labels(self.model_name).observe(time.perf_counter() - track.t0)
                await _aclose(events)

        return SSEResponse(body())

    # -- control -------------------------------------------------------------------------
    async def control(self, call: Callable[[], Awaitable[dict]]) -> Response:
        try:
            return json_response(await call())
        except Exception as e:
            raise engine_error(e) from None


# -- small helpers ------------------------------------------------------------------------------
async def _aclose(gen) -> None:
    try:
        await gen.aclose()
    except Exception:
        pass


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(_json(obj), status, media_type="application/json")


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def usage_of(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    comp = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp}


def work_of(outs: list[RequestOutput], logprobs: int | None) -> int:
    """How many entries a response will hold: tokens, times the top-logprobs per token."""
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return tokens * (1 + (logprobs or 0))


def _longest_token_chars(tokenizer) -> int:
    if tokenizer is None:
        return 1
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # no vocabulary to read: assume long tokens rather than reject real prompts
        return 256
    return max((len(t) for t in vocab), default=1)


def _default_name(model: str | None) -> str:
    if model is None:
        return "tidal-default"
    return os.path.basename(os.path.normpath(model)) or model


@dataclass(slots=True)
class WeightLabels:
    """SGLang names weight versions with strings; the engine counts them with integers (its
    weight spans need an order). A label that is an integer is that version; any other label
    names the next version, and is reported back wherever that version is."""

    by_version: dict[int, str] = field(default_factory=dict)

    def label(self, version: int | None) -> str | None:
        return None if version is None else self.by_version.get(version, str(version))

    async def version_for(self, core: ServerCore, given: str | int | None) -> int | None:
        if given is None or isinstance(given, int):
            return given
        if given.isdigit():
            return int(given)
        current = (await core.engine.state())["weight_version"]
        # The label of the weights serving now names them (the update is skipped); any other, the next.
        return current if self.by_version.get(current) == given else current + 1

    def record(self, result: dict, given: str | int | None) -> dict:
        v = result.get("weight_version")
        if given is not None and isinstance(v, int):
            self.by_version[v] = str(given)
        return {**result, "weight_version": self.label(v) if isinstance(v, int) else v}
