"""SGLang's control and info routes, as slime, miles and AReaL call them (docs/compatibility.md,
"SGLang-native surface"), over the same EngineClient as Tidal's own /v1 control routes.

Replies follow SGLang: {success, message, ...} for operations (a failed operation answers
success=false with status 400), plain objects for the info routes. Bodies that do not parse
answer Tidal's error object. /update_weights_from_tensor reads no pickle: SGLang's own
serialisation is pickle, which a server must never load from a request, so only base64
safetensors bytes are accepted (load_format="safetensors").
"""

from __future__ import annotations

import base64
import os
import tempfile
import time
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from tidal.engine.weight_transfer import SHM_DIR
from tidal.sampling_params import SamplingParams
from tidal.server.control_routes import ControlRoutes
from tidal.server.errors import APIError
from tidal.server.generate_routes import GenerateRoutes
from tidal.server.service import CONTROL_ERRORS, ServerCore, WeightLabels, json_response

Label = Annotated[str, Field(min_length=1, max_length=256)] | Annotated[int, Field(ge=0, le=2**62)]
RequestId = Annotated[str, Field(min_length=1, max_length=256)]
# SGLang's memory tags. Tidal's CUDA graphs share one small pool kept while asleep, so
# "cuda_graph" is accepted and releases nothing more (docs/compatibility.md).
MemoryTag = Literal["kv_cache", "weights", "cuda_graph"]
PAUSE_MODES = {"abort": "abort", "retract": "retract", "in_place": "keep"}


class _SGLangBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class SGLangAbort(_SGLangBody):
    """Exactly one of `rid` and `abort_all=true` (400 otherwise, param `rid`)."""

    rid: RequestId | None = None
    abort_all: StrictBool = False


class SGLangPause(_SGLangBody):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class SGLangMemoryTags(_SGLangBody):
    tags: list[MemoryTag] | None = None


class SGLangUpdateFromDisk(_SGLangBody):
    model_path: Annotated[str, Field(min_length=1, max_length=4096)]
    load_format: Literal["auto", "safetensors"] | None = None
    weight_version: Label | None = None
    flush_cache: StrictBool = True
    abort_all_requests: StrictBool = False
    allow_interrupt: StrictBool = False  # AReaL's patched SGLang: the same as abort_all_requests


class SGLangUpdateFromTensor(_SGLangBody):
    serialized_named_tensors: Annotated[list[str], Field(min_length=1, max_length=1)]
    load_format: str | None = None
    weight_version: Label | None = None
    flush_cache: StrictBool = True
    abort_all_requests: StrictBool = False


class SGLangRoutes:
    """/abort_request, /pause_generation, /continue_generation, /flush_cache, memory release and
    resume, weight updates from disk and from tensors, and the info routes."""

    def __init__(
        self, core: ServerCore, generate: GenerateRoutes, control: ControlRoutes, labels: WeightLabels
    ) -> None:
        self.core, self.generate, self.control, self.labels = core, generate, control, labels
        self.slept_serving = False  # release_memory paused a serving engine: resume_memory resumes it

    def register(self, app: FastAPI, user: list, admin: list) -> None:
        op: dict[str, Any] = dict(dependencies=admin, responses=CONTROL_ERRORS)
        app.post("/abort_request", **op)(self.abort_request)
        app.post("/pause_generation", **op)(self.pause_generation)
        app.post("/continue_generation", **op)(self.continue_generation)
        app.api_route("/flush_cache", methods=["GET", "POST"], **op)(self.flush_cache)
        app.post("/release_memory_occupation", **op)(self.release_memory)
        app.post("/resume_memory_occupation", **op)(self.resume_memory)
        app.post("/update_weights_from_disk", **op)(self.update_from_disk)
        app.post("/update_weights_from_tensor", **op)(self.update_from_tensor)
        info: dict[str, Any] = dict(dependencies=user, responses=CONTROL_ERRORS)
        app.get("/get_server_info", **info)(self.server_info)
        app.get("/get_model_info", **info)(self.model_info)
        app.get("/get_weight_version", **info)(self.weight_version)
        app.get("/v1/loads", **info)(self.loads)
        app.get("/health_generate", **info)(self.health_generate)

    async def _reply(self, call, **extra: Any) -> Response:
        try:
            result = await call()
        except APIError:
            raise
        except Exception as e:
            return json_response({"success": False, "message": f"{type(e).__name__}: {e}"}, 400)
        return json_response({"success": True, "message": "ok", **extra, **(result or {})})

    # -- generation control ----------------------------------------------------------------
    async def abort_request(self, body: SGLangAbort) -> Response:
        if body.abort_all == (body.rid is not None):
            raise APIError(400, "give exactly one of rid or abort_all=true", param="rid")
        ids = None if body.rid is None else self.generate.engine_ids(body.rid)
        return await self._reply(lambda: self.core.engine.abort(ids))

    async def pause_generation(self, body: SGLangPause | None = None) -> Response:
        mode = PAUSE_MODES[(body or SGLangPause()).mode]
        return await self._reply(lambda: self.core.engine.pause(mode))

    async def continue_generation(self) -> Response:
        return await self._reply(lambda: self.core.engine.resume())

    async def flush_cache(self) -> Response:
        return await self._reply(lambda: self.core.engine.flush_cache())

    async def release_memory(self, body: SGLangMemoryTags | None = None) -> Response:
        """SGLang releases memory on a serving engine; Tidal sleeps a paused one. So a serving
        engine is paused in place first, and resumed once everything is awake again."""
        tags = self._tags(body)

        async def call() -> dict:
            engine = self.core.engine
            if (await engine.state())["state"] == "serving":
                await engine.pause("keep")
                self.slept_serving = True
            try:
                return await engine.sleep(tags)
            except Exception:
                if self.slept_serving and not (await engine.state())["sleeping"]:
                    await engine.resume()
                    self.slept_serving = False
                raise

        return await self._reply(call)

    async def resume_memory(self, body: SGLangMemoryTags | None = None) -> Response:
        tags = self._tags(body)

        async def call() -> dict:
            engine = self.core.engine
            result = await engine.wake_up(tags)
            if self.slept_serving and not (await engine.state())["sleeping"]:
                await engine.resume()
                self.slept_serving = False
                result = {**result, "resumed": True}
            return result

        return await self._reply(call)

    @staticmethod
    def _tags(body: SGLangMemoryTags | None) -> list[str] | None:
        if body is None or body.tags is None:
            return None
        return sorted({t for t in body.tags if t != "cuda_graph"}) or []

    # -- weights ---------------------------------------------------------------------------
    async def update_from_disk(self, body: SGLangUpdateFromDisk) -> Response:
        self._flush_required(body.flush_cache)
        path = self.control._weights_path(body.model_path)
        return await self._update(
            body,
            lambda version: self.core.engine.update_weights(
                path, version=version, timeout_s=max(self.core.settings.control_timeout_s, 600.0)
            ),
        )

    async def update_from_tensor(self, body: SGLangUpdateFromTensor) -> Response:
        if body.load_format != "safetensors":
            raise APIError.invalid(
                "load_format",
                body.load_format,
                "'safetensors' (serialized_named_tensors[0] is base64 safetensors bytes); "
                "SGLang's default serialisation is pickle, which Tidal never loads from a request",
            )
        self._flush_required(body.flush_cache)
        try:
            blob = base64.b64decode(body.serialized_named_tensors[0], validate=True)
        except ValueError:
            raise APIError.invalid("serialized_named_tensors", "(not base64)", "base64 safetensors bytes") from None
        shm_path, specs = _safetensors_to_shm(blob)

        async def push(version: int | None) -> dict:
            try:
                return await self.core.engine.update_weights(
                    source="shm", shm_path=shm_path, tensors=specs, version=version, timeout_s=600.0
                )
            finally:
                os.unlink(shm_path)

        return await self._update(body, push)

    @staticmethod
    def _flush_required(flush: bool) -> None:
        if not flush:
            raise APIError(
                400,
                "flush_cache=false is not supported: a weight commit always invalidates the prefix "
                "cache (its KV came from the old weights)",
                param="flush_cache",
            )

    async def _update(self, body: SGLangUpdateFromDisk | SGLangUpdateFromTensor, push) -> Response:
        async def call() -> dict:
            version = await self.labels.version_for(self.core, body.weight_version)
            interrupt = body.abort_all_requests or getattr(body, "allow_interrupt", False)
            aborted = (await self.core.engine.abort(None))["num_aborted_samples"] if interrupt else 0
            result = self.labels.record(await push(version), body.weight_version)
            return {**result, "num_paused_requests": 0, "num_aborted_samples": aborted}

        return await self._reply(call)

    # -- info ------------------------------------------------------------------------------
    async def _state(self) -> dict:
        try:
            return await self.core.engine.state()
        except Exception as e:
            from tidal.server.errors import engine_error

            raise engine_error(e) from None

    async def server_info(self) -> Response:
        st = await self._state()
        engine = self.core.engine
        cfg = self.core.engine_config
        return json_response(
            {
                "model_path": engine.model_path,
                "tokenizer_path": engine.model_path,
                "served_model_name": self.core.model_name,
                "context_length": engine.max_model_len,
                "weight_version": self.labels.label(st["weight_version"]),
                "version": "tidal-0.1.0",
                "tp_size": 1,
                "dp_size": 1,
                "page_size": getattr(cfg, "block_size", None),
                "skip_tokenizer_init": engine.tokenizer is None,
                "engine_state": st["state"],
                "internal_states": [{"num_running_reqs": st["num_running"], "num_waiting_reqs": st["num_waiting"]}],
            }
        )

    async def model_info(self) -> Response:
        st = await self._state()
        engine = self.core.engine
        label = self.labels.label(st["weight_version"])
        return json_response(
            {
                "model_path": engine.model_path,
                "tokenizer_path": engine.model_path,
                "served_model_name": self.core.model_name,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": label,
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": None,
                "architectures": None,
            }
        )

    async def weight_version(self) -> Response:
        st = await self._state()
        return json_response({"weight_version": self.labels.label(st["weight_version"])})

    async def loads(self) -> Response:
        st = await self._state()
        return json_response(
            {
                "timestamp": time.time(),
                "dp_rank_count": 1,
                "loads": [
                    {
                        "dp_rank": 0,
                        "num_running_reqs": st["num_running"],
                        "num_waiting_reqs": st["num_waiting"],
                        "num_used_tokens": st["kv_blocks_used"]
                        * (getattr(self.core.engine_config, "block_size", 1) or 1),
                        "max_total_num_tokens": st["kv_blocks_total"]
                        * (getattr(self.core.engine_config, "block_size", 1) or 1),
                        "token_usage": st["kv_blocks_used"] / max(1, st["kv_blocks_total"]),
                    }
                ],
            }
        )

    async def health_generate(self) -> Response:
        """One greedy token through the engine: 200 when it comes back, 503 otherwise."""
        params = SamplingParams(max_tokens=1, temperature=0.0)
        try:
            async for _ in self.core.engine.generate(None, params, stream=False, timeout_s=20.0, prompt_token_ids=[0]):
                pass
        except Exception as e:
            return json_response({"status": "unhealthy", "reason": f"{type(e).__name__}: {e}"}, 503)
        return json_response({"status": "ok"})


def _safetensors_to_shm(blob: bytes) -> tuple[str, list[dict]]:
    """safetensors bytes -> a /dev/shm file and the tensor specs (name, dtype, shape, offset)
    that Tidal's shm weight source reads. The header is JSON; nothing in it is executed."""
    import json
    import struct

    if len(blob) < 8:
        raise APIError.invalid("serialized_named_tensors", f"{len(blob)} bytes", "safetensors bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError:
        raise APIError.invalid("serialized_named_tensors", "(bad header)", "safetensors bytes") from None
    dtypes = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32"}
    specs = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict) or meta.get("dtype") not in dtypes:
            raise APIError.invalid(
                "serialized_named_tensors", f"tensor {name!r}", f"a tensor of dtype one of {sorted(dtypes)}"
            )
        specs.append(
            {
                "name": name,
                "dtype": dtypes[meta["dtype"]],
                "shape": list(meta["shape"]),
                "offset": 8 + n + int(meta["data_offsets"][0]),
            }
        )
    fd, path = tempfile.mkstemp(prefix="tidal-sgl-", dir=SHM_DIR)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    return path, specs
