"""vLLM's RL HTTP surface (its dev-mode routes, as TRL, SkyRL, prime-rl and open-instruct call
them) over Tidal's control plane: pause / resume / is_paused, sleep / wake_up / is_sleeping,
reset_prefix_cache, abort_requests, get_world_size, weight_info / update_weight_version,
token-in token-out /inference/v1/generate, and the weight-transfer routes
(init_weight_transfer_engine, start_weight_update, update_weights, finish_weight_update) over
Tidal's torch.distributed transport. docs/compatibility.md lists every field and difference.

vLLM's weight versions are strings; Tidal's engine counts versions as integers (every token
carries one). A string given by finish_weight_update or update_weight_version is a label for
the engine's version at that moment: /weight_info reports it until the weights change again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from tidal.outputs import CompletionOutput, RequestOutput
from tidal.server import schemas as S
from tidal.server.errors import APIError, engine_error
from tidal.server.openai_routes import chat_logprobs, vllm_prompt_logprobs
from tidal.server.service import (
    CONTROL_ERRORS,
    INFERENCE_ERRORS,
    JSON_OR_SSE,
    Fields,
    ServerCore,
    Track,
    WeightLabels,
    event,
    json_response,
    merge,
    sampling_params,
    work_of,
)

_PAUSE_MODES = {"abort": "abort", "wait": "drain", "keep": "keep"}  # vLLM's mode -> Tidal's
_SLEEP_LEVELS = {1: False, 2: True}  # level -> discard the weights
UPDATE_TIMEOUT_S = 600.0
Label = Annotated[str, Field(min_length=1, max_length=256)]
PauseMode = Literal["abort", "wait", "keep"]
Tag = Literal["kv_cache", "weights"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class VLLMSamplingParams(_Strict):
    """The vLLM SamplingParams fields /inference/v1/generate takes; any other one is a 400."""

    n: Annotated[int, Field(ge=1, le=128)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=1e4)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=2**31 - 1)] = -1
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    seed: S.Seed | None = None
    max_tokens: S.NonNegInt | None = 16
    min_tokens: S.NonNegInt = 0
    stop: str | S.StopList | None = None
    stop_token_ids: Annotated[list[S.TokenId], Field(max_length=1024)] | None = None
    ignore_eos: StrictBool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    detokenize: StrictBool = True
    logprobs_mode: S.LogprobsMode | None = None  # Tidal's


class VLLMGenerateRequest(_Strict):
    request_id: S.RequestId | None = None
    token_ids: Annotated[list[S.TokenId], Field(min_length=1)]
    sampling_params: VLLMSamplingParams = Field(default_factory=VLLMSamplingParams)
    model: str | None = None
    stream: StrictBool | None = False
    stream_options: S.StreamOptions | None = None
    cache_salt: None = None  # only null: one prefix cache, unsalted
    priority: Literal[0] = 0  # only 0: no priority scheduling
    kv_transfer_params: None = None  # only null: no disaggregated serving
    features: None = None  # only null: text models only


class NCCLInitInfo(_Strict):
    """vLLM's NCCLWeightTransferInitInfo, plus Tidal's group options."""

    master_address: Annotated[str, Field(min_length=1, max_length=255)]
    master_port: Annotated[int, Field(ge=1, le=65535)]
    rank_offset: Annotated[int, Field(ge=1, le=65535)]
    world_size: Annotated[int, Field(ge=2, le=65536)]
    group_name: Annotated[str, Field(min_length=1, max_length=256)] = "tidal-weights"
    backend: Literal["gloo", "nccl"] = "gloo"
    timeout_s: Annotated[float, Field(ge=0.1, le=86400)] | None = None


class InitWeightTransferEngine(_Strict):
    init_info: NCCLInitInfo


class NCCLUpdateInfo(_Strict):
    """vLLM's NCCLWeightTransferUpdateInfo: tensors broadcast one by one, in `names` order."""

    names: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(min_length=1)]
    dtype_names: list[Annotated[str, Field(min_length=1, max_length=32)]]
    shapes: list[list[Annotated[int, Field(ge=0, le=2**40)]]]
    packed: StrictBool = False
    is_checkpoint_format: StrictBool = True


class UpdateWeightsBody(_Strict):
    update_info: NCCLUpdateInfo


class StartWeightUpdate(_Strict):
    is_checkpoint_format: StrictBool = True


class FinishWeightUpdate(_Strict):
    weight_version: Label | None = None


class UpdateWeightVersion(_Strict):
    new_version: Label


class AbortRequestsBody(_Strict):
    request_ids: Annotated[list[S.RequestId], Field(max_length=100_000)] | None = None


class VLLMRoutes:
    """vLLM's RL routes. Inference (/inference/v1/generate) takes the API key, every other route
    the admin key, as Tidal's own control routes do."""

    def __init__(self, core: ServerCore, labels: WeightLabels) -> None:
        self.core = core
        self.labels = labels  # shared with the SGLang routes: one label per engine version
        self.round_open = False  # between start_weight_update and finish
        self.paused_for_sleep = False  # /sleep paused a serving engine: wake_up resumes it

    def register(self, app: FastAPI, user: list, admin: list) -> None:
        control: dict[str, Any] = dict(dependencies=admin, responses=CONTROL_ERRORS)
        app.post("/pause", **control)(self.pause)
        app.post("/resume", **control)(self.resume)
        app.get("/is_paused", **control)(self.is_paused)
        app.post("/sleep", **control)(self.sleep)
        app.post("/wake_up", **control)(self.wake_up)
        app.get("/is_sleeping", **control)(self.is_sleeping)
        app.post("/reset_prefix_cache", **control)(self.reset_prefix_cache)
        app.post("/abort_requests", **control)(self.abort_requests)
        app.get("/get_world_size", **control)(self.get_world_size)
        app.get("/weight_info", **control)(self.weight_info)
        app.post("/update_weight_version", **control)(self.update_weight_version)
        app.post("/init_weight_transfer_engine", **control)(self.init_weight_transfer_engine)
        app.post("/start_weight_update", **control)(self.start_weight_update)
        app.post("/update_weights", **control)(self.update_weights)
        app.post("/finish_weight_update", **control)(self.finish_weight_update)
        app.post("/inference/v1/generate", dependencies=user, responses={**JSON_OR_SSE, **INFERENCE_ERRORS})(
            self.generate
        )

    async def _call(self, make) -> Any:
        try:
            return await make()
        except APIError:
            raise
        except Exception as e:
            raise engine_error(e) from None

    # -- pause / resume ------------------------------------------------------------------
    async def pause(
        self,
        mode: Annotated[PauseMode, Query()] = "abort",
        clear_cache: Annotated[bool, Query(description="flush the prefix cache (not with keep)")] = True,
        wait_for_inflight_requests: Annotated[bool, Query(description="vLLM's older spelling of mode=wait")] = False,
    ) -> Response:
        if wait_for_inflight_requests:
            if mode == "keep":
                raise APIError.invalid("wait_for_inflight_requests", True, "false with mode=keep")
            mode = "wait"
        engine = self.core.engine
        result = await self._call(lambda: engine.pause(_PAUSE_MODES[mode]))
        if clear_cache and mode != "keep":
            await self._call(lambda: engine.flush_cache())
        return json_response({"status": "paused", "mode": mode, "detail": result})

    async def resume(self) -> Response:
        result = await self._call(lambda: self.core.engine.resume())
        self.paused_for_sleep = False
        return json_response({"status": "resumed", "detail": result})

    async def is_paused(self) -> Response:
        st = await self._call(lambda: self.core.engine.state())
        return json_response({"is_paused": st["state"] != "serving"})

    # -- sleep / wake_up -----------------------------------------------------------------
    async def sleep(
        self,
        level: Annotated[
            int | None, Query(ge=1, le=2, description="1: weights to CPU, KV cache freed; 2: both freed")
        ] = None,
        tags: Annotated[list[Tag] | None, Query(description="Tidal's: only these (not with level)")] = None,
        mode: Annotated[PauseMode, Query(description="requests in flight, when serving")] = "abort",
    ) -> Response:
        if level is not None and tags is not None:
            raise APIError(400, "give level or tags, not both", param="tags")
        engine = self.core.engine
        st = await self._call(lambda: engine.state())
        pausing = st["state"] == "serving"
        if pausing:
            await self._call(lambda: engine.pause(_PAUSE_MODES[mode]))
        discard = _SLEEP_LEVELS[level or 1] if tags is None else False
        try:
            result = await self._call(lambda: engine.sleep(tags, discard))
        except APIError:
            if pausing:  # nothing sleeps: serve again rather than hold every later request
                await self._call(lambda: engine.resume())
            raise
        self.paused_for_sleep = self.paused_for_sleep or pausing
        return json_response({"status": "sleeping", "level": level if tags is None else None, "detail": result})

    async def wake_up(self, tags: Annotated[list[Tag] | None, Query()] = None) -> Response:
        engine = self.core.engine
        result = await self._call(lambda: engine.wake_up(tags))
        if self.paused_for_sleep and not result["sleeping"]:
            await self._call(lambda: engine.resume())
            self.paused_for_sleep = False
            result["state"] = "serving"
        return json_response({"status": "awake" if not result["sleeping"] else "sleeping", "detail": result})

    async def is_sleeping(self) -> Response:
        st = await self._call(lambda: self.core.engine.state())
        return json_response({"is_sleeping": bool(st["sleeping"])})

    # -- cache, abort, world size -----------------------------------------------------------
    async def reset_prefix_cache(self) -> Response:
        result = await self._call(lambda: self.core.engine.flush_cache())
        return json_response({"status": "ok", "detail": result})

    async def abort_requests(self, body: AbortRequestsBody | None = None) -> Response:
        ids = (body.request_ids if body is not None else None) or None  # empty or missing: all
        result = await self._call(lambda: self.core.engine.abort(ids))
        return json_response({"status": "aborted", "aborted": len(result.get("aborted", [])), "detail": result})

    async def get_world_size(self, include_dp: Annotated[bool, Query()] = True) -> Response:
        # One engine process serves the model: one rank takes part in a weight-transfer group.
        return json_response({"world_size": 1})

    # -- weight versions -----------------------------------------------------------------
    async def _version(self) -> int:
        st = await self._call(lambda: self.core.engine.state())
        return int(st["weight_version"])

    async def weight_info(self) -> Response:
        version = await self._version()
        return json_response({"weight_version": self.labels.label(version), "engine_weight_version": version})

    async def update_weight_version(self, body: UpdateWeightVersion) -> Response:
        self.labels.by_version[await self._version()] = body.new_version
        return json_response({"success": True, "new_version": body.new_version})

    # -- weight transfer -----------------------------------------------------------------
    async def init_weight_transfer_engine(self, body: InitWeightTransferEngine) -> Response:
        info = body.init_info
        result = await self._call(lambda: self.core.engine.init_weight_transfer(**info.model_dump()))
        return json_response({"message": "Weight transfer initialized", "detail": result})

    async def start_weight_update(self, body: StartWeightUpdate | None = None) -> Response:
        self._check_checkpoint_format(body.is_checkpoint_format if body else True, "is_checkpoint_format")
        st = await self._call(lambda: self.core.engine.state())
        if self.round_open or st.get("weight_transfer", {}).get("staged_version") is not None:
            await self._call(lambda: self.core.engine.abort_staged())  # a round left unfinished
        self.round_open = True
        return json_response({"message": "Weight update started"})

    async def update_weights(self, body: UpdateWeightsBody) -> Response:
        info = body.update_info
        if not len(info.names) == len(info.dtype_names) == len(info.shapes):
            raise APIError(
                400,
                f"update_info has {len(info.names)} names, {len(info.dtype_names)} dtype_names and "
                f"{len(info.shapes)} shapes: expected one each per tensor",
                param="update_info.names",
            )
        if info.packed:
            raise APIError.invalid(
                "update_info.packed",
                True,
                "false: tensors are broadcast one by one in names "
                "order (vLLM's packed buffers are not Tidal's bucket layout)",
            )
        self._check_checkpoint_format(info.is_checkpoint_format, "update_info.is_checkpoint_format")
        tensors = [{"name": n, "dtype": d, "shape": s} for n, d, s in zip(info.names, info.dtype_names, info.shapes)]
        # Inside a round the tensors are staged until finish_weight_update; outside one (vLLM's
        # older flow: init, then update_weights) they are committed at once.
        result = await self._call(
            lambda: self.core.engine.update_weights(
                source="distributed", tensors=tensors, commit=not self.round_open, timeout_s=UPDATE_TIMEOUT_S
            )
        )
        return json_response({"message": "Weights updated", "detail": result})

    async def finish_weight_update(self, body: FinishWeightUpdate | None = None) -> Response:
        if not self.round_open:
            raise APIError(
                409,
                "finish_weight_update: no weight update was started (call /start_weight_update, then /update_weights)",
                "conflict_error",
            )
        engine = self.core.engine
        result = await self._call(lambda: engine.commit_weights(None))
        self.round_open = False
        label = body.weight_version if body is not None else None
        if label is not None:
            self.labels.by_version[int(result["weight_version"])] = label
        return json_response(
            {
                "message": "Weight update finished",
                "weight_version": label or str(result["weight_version"]),
                "detail": result,
            }
        )

    @staticmethod
    def _check_checkpoint_format(value: bool, field: str) -> None:
        if not value:
            raise APIError.invalid(field, False, "true: tensors arrive under the checkpoint's own names")

    # -- /inference/v1/generate ------------------------------------------------------------
    async def generate(self, body: VLLMGenerateRequest, request: Request) -> Response:
        self.core.check_model(body.model)
        sp = body.sampling_params
        if not sp.detokenize:
            raise APIError.invalid("sampling_params.detokenize", False, "true (text is always decoded)")
        max_tokens = 16 if sp.max_tokens is None else sp.max_tokens
        params = sampling_params(sp, max_tokens, sp.logprobs, "sampling_params.", sp.prompt_logprobs)
        fields = Fields("token_ids", "sampling_params.")
        prepared = await self.core.prepare([body.token_ids], params, fields)
        rid = self.core.request_id(body.request_id, "gen")
        gens = self.core.start_requests(prepared, params, rid, bool(body.stream))
        track = Track(self.core.metrics, params.n)
        if body.stream:
            return await self.core.sse(request, self._events(body, rid, gens, track), track, rid, fields)
        o = (await self.core.run_collect(request, gens, rid, fields, track.left))[0]

        def build() -> dict:
            return {
                "request_id": rid,
                "choices": [self._choice(sp, c) for c in o.outputs],
                "prompt_logprobs": self._prompt_logprobs(sp, o),
                "kv_transfer_params": None,
            }

        work = work_of([o], sp.logprobs) + len(o.prompt_token_ids) * (sp.prompt_logprobs or 0)
        return await self.core.respond(build, work)

    def _choice(self, sp: VLLMSamplingParams, c: CompletionOutput) -> dict:
        logprobs = None
        if sp.logprobs is not None:
            logprobs = chat_logprobs(self.core.token_text, c, sp.logprobs, as_ids=True)
        return {
            "index": c.index,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
            "token_ids": c.token_ids,
            "stop_reason": c.stop_reason,
            "weight_version": c.weight_version,
        }

    @staticmethod
    def _prompt_logprobs(sp: VLLMSamplingParams, o: RequestOutput) -> list | None:
        return None if sp.prompt_logprobs is None else vllm_prompt_logprobs(o, sp.prompt_logprobs, as_ids=True)

    async def _events(self, body: VLLMGenerateRequest, rid: str, gens, track: Track) -> AsyncIterator[bytes]:
        sp, first = body.sampling_params, True
        totals: dict[int, int] = {}
        async for _, out in merge(gens, track):
            track.tokens(sum(len(c.token_ids) for c in out.outputs))
            choices = []
            for c in out.outputs:
                if not c.token_ids and c.finish_reason is None:
                    continue
                totals[c.index] = totals.get(c.index, 0) + len(c.token_ids)
                if c.finish_reason is not None:
                    track.finish(c.finish_reason)
                choices.append(self._choice(sp, c))
            if choices or first:
                chunk = {
                    "request_id": rid,
                    "choices": choices,
                    "kv_transfer_params": None,
                    "prompt_logprobs": self._prompt_logprobs(sp, out) if first else None,
                }
                first = False
                yield event(chunk)
        n_prompt = len(body.token_ids)
        self.core.metrics.prompt_tokens.labels(self.core.model_name).inc(n_prompt)
        if body.stream_options is not None and body.stream_options.include_usage:
            comp = sum(totals.values())
            yield event(
                {
                    "request_id": rid,
                    "choices": [],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": comp, "total_tokens": n_prompt + comp},
                }
            )
        yield b"data: [DONE]\n\n"
