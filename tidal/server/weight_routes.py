"""HTTP routes for weight transfer from trainers (DESIGN.md §8), Tidal's and SGLang's shapes.

Tidal: /v1/init_weight_transfer, /v1/destroy_weight_transfer, /v1/check_weights,
/v1/update_weights_from_distributed | _shm | _ipc (commit=false stages and holds),
/v1/commit_weights, /v1/abort_staged, /v1/fence. SGLang: /init_weights_update_group,
/destroy_weights_update_group, /update_weights_from_distributed {names, dtypes, shapes,
group_name, weight_version, flush_cache}, answering {success, message}. Every body is JSON;
unknown fields are refused (no field is silently ignored).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from tidal.server.engine_client import EngineClient
from tidal.server.errors import APIError
from tidal.server.service import CONTROL_ERRORS, ServerCore, WeightLabels, json_response

Port = Annotated[int, Field(ge=1, le=65535)]
Timeout = Annotated[float, Field(ge=0.1, le=86400)]
Version = Annotated[int, Field(ge=0, le=2**62)]
Name = Annotated[str, Field(min_length=1, max_length=256)]
UPDATE_TIMEOUT_S = 600.0  # an update's deadline when the body gives none


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TensorMeta(_Body):
    name: Name
    dtype: Annotated[str, Field(min_length=1, max_length=32)]
    shape: Annotated[list[Annotated[int, Field(ge=0, le=2**40)]], Field(max_length=8)]
    offset: Annotated[int, Field(ge=0, le=2**50)] | None = None


class BucketMeta(_Body):
    nbytes: Annotated[int, Field(ge=1, le=2**50)]
    tensors: Annotated[list[TensorMeta], Field(min_length=1)]


class InitTransfer(_Body):
    master_address: Annotated[str, Field(min_length=1, max_length=255)]
    master_port: Port
    rank_offset: Annotated[int, Field(ge=1, le=65535)]
    world_size: Annotated[int, Field(ge=2, le=65536)]
    group_name: Name = "tidal-weights"
    backend: Literal["gloo", "nccl"] = "gloo"
    timeout_s: Timeout | None = None


class DestroyTransfer(_Body):
    group_name: Name | None = None


class CheckWeights(_Body):
    tensors: Annotated[list[TensorMeta], Field(min_length=1)]


class _Update(_Body):
    version: Version | None = None
    checksums: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] | None = None
    commit: StrictBool = True
    timeout_s: Timeout | None = None
    staging: Literal["copy", "in_place"] = "copy"  # in_place: no second copy, generation held meanwhile


class UpdateDistributed(_Update):
    group_name: Name | None = None
    layout: Literal["per_tensor", "bucketed"] = "per_tensor"
    tensors: list[TensorMeta] | None = None
    buckets: list[BucketMeta] | None = None


class UpdateShm(_Update):
    shm_path: Annotated[str, Field(min_length=1, max_length=512)]
    tensors: Annotated[list[TensorMeta], Field(min_length=1)]


Count = Annotated[int, Field(ge=0, le=2**62)]
B64 = Annotated[str, Field(max_length=4096)]


class IpcHandle(_Body):
    """A CUDA tensor's sharing handle as encode_ipc_handle writes it (bytes as base64)."""

    size: Annotated[list[Count], Field(max_length=16)]
    stride: Annotated[list[Count], Field(max_length=16)]
    offset: Count
    dtype: Annotated[str, Field(max_length=32)]
    device: Annotated[int, Field(ge=0, le=1024)]
    handle: B64 | None
    storage_size_bytes: Count
    storage_offset_bytes: Count
    ref_counter_handle: B64 | None
    ref_counter_offset: Count
    event_handle: B64 | None
    event_sync_required: StrictBool


class UpdateIpc(_Update):
    tensors: Annotated[list[TensorMeta], Field(min_length=1)]
    ipc_handles: list[IpcHandle]


class CommitWeights(_Body):
    version: Version | None = None
    timeout_s: Timeout | None = None


class Fence(_Body):
    reason: Annotated[str, Field(max_length=500)] = "fenced by the caller"


class SGLangUpdate(_Body):
    names: Annotated[list[Name], Field(min_length=1)]
    dtypes: list[Annotated[str, Field(max_length=32)]]
    shapes: list[list[Annotated[int, Field(ge=0, le=2**40)]]]
    group_name: Name = "weight_update_group"
    weight_version: Annotated[str, Field(min_length=1, max_length=256)] | Version | None = None
    flush_cache: StrictBool = True


def _tensors(items: list[TensorMeta] | None) -> list[dict] | None:
    return None if items is None else [t.model_dump(exclude_none=True) for t in items]


class SGLangReply(BaseModel):
    success: bool
    message: str


def register(app: FastAPI, server: ServerCore, labels: WeightLabels | None = None) -> None:
    """Install the routes on `app`, guarded by the admin key like every control route."""
    admin = [Depends(server.require_admin_key)]
    labels = labels or WeightLabels()

    def engine() -> EngineClient:  # the client exists once the server has started
        return server.engine

    async def init(body: InitTransfer) -> Response:
        return await server.control(lambda: engine().init_weight_transfer(**body.model_dump()))

    async def destroy(body: DestroyTransfer | None = None) -> Response:
        body = body or DestroyTransfer()
        return await server.control(lambda: engine().destroy_weight_transfer(body.group_name))

    async def check(body: CheckWeights) -> Response:
        return await server.control(lambda: engine().check_weights(_tensors(body.tensors) or []))

    def common(body: _Update) -> dict[str, Any]:
        return {
            "version": body.version,
            "checksums": body.checksums,
            "commit": body.commit,
            "timeout_s": body.timeout_s or UPDATE_TIMEOUT_S,
            "staging": body.staging,
        }

    async def update_distributed(body: UpdateDistributed) -> Response:
        bucketed = body.layout == "bucketed"
        if bucketed != (body.buckets is not None) or (body.buckets is None) == (body.tensors is None):
            raise APIError(
                400, "give tensors with layout='per_tensor' or buckets with layout='bucketed'", param="layout"
            )
        buckets = (
            None
            if body.buckets is None
            else [{"nbytes": b.nbytes, "tensors": _tensors(b.tensors)} for b in body.buckets]
        )
        return await server.control(
            lambda: engine().update_weights(
                source="distributed",
                group_name=body.group_name,
                layout=body.layout,
                tensors=_tensors(body.tensors),
                buckets=buckets,
                **common(body),
            )
        )

    async def update_shm(body: UpdateShm) -> Response:
        return await server.control(
            lambda: engine().update_weights(
                source="shm", shm_path=body.shm_path, tensors=_tensors(body.tensors), **common(body)
            )
        )

    async def update_ipc(body: UpdateIpc) -> Response:
        return await server.control(
            lambda: engine().update_weights(
                source="ipc",
                tensors=_tensors(body.tensors),
                ipc_handles=[h.model_dump() for h in body.ipc_handles],
                **common(body),
            )
        )

    async def commit(body: CommitWeights | None = None) -> Response:
        body = body or CommitWeights()
        return await server.control(lambda: engine().commit_weights(body.version, body.timeout_s))

    async def abort() -> Response:
        return await server.control(lambda: engine().abort_staged())

    async def fence(body: Fence | None = None) -> Response:
        body = body or Fence()
        return await server.control(lambda: engine().fence(body.reason))

    # -- SGLang's shapes -------------------------------------------------------------------
    async def sgl_reply(call: Callable[[], Awaitable[dict]]) -> Response:
        try:
            result = await call()
        except Exception as e:
            return json_response({"success": False, "message": f"{type(e).__name__}: {e}"}, 400)
        return json_response({"success": True, "message": "ok", **result})

    async def sgl_init(body: InitTransfer) -> Response:
        return await sgl_reply(lambda: engine().init_weight_transfer(**body.model_dump()))

    async def sgl_destroy(body: DestroyTransfer | None = None) -> Response:
        return await sgl_reply(lambda: engine().destroy_weight_transfer((body or DestroyTransfer()).group_name))

    async def sgl_update(body: SGLangUpdate) -> Response:
        if not len(body.names) == len(body.dtypes) == len(body.shapes):
            raise APIError(
                400,
                f"names, dtypes and shapes have {len(body.names)}, {len(body.dtypes)} and "
                f"{len(body.shapes)} entries: expected one each per tensor",
                param="names",
            )
        if not body.flush_cache:
            raise APIError(
                400,
                "flush_cache=false is not supported: a weight commit always invalidates "
                "the prefix cache (its KV came from the old weights)",
                param="flush_cache",
            )
        tensors = [{"name": n, "dtype": d, "shape": s} for n, d, s in zip(body.names, body.dtypes, body.shapes)]

        async def call() -> dict:
            version = await labels.version_for(server, body.weight_version)
            result = await engine().update_weights(
                source="distributed",
                group_name=body.group_name,
                tensors=tensors,
                version=version,
                timeout_s=UPDATE_TIMEOUT_S,
            )
            return labels.record(result, body.weight_version)

        return await sgl_reply(call)

    routes: list[tuple[str, Callable[..., Any]]] = [
        ("/v1/init_weight_transfer", init),
        ("/v1/destroy_weight_transfer", destroy),
        ("/v1/check_weights", check),
        ("/v1/update_weights_from_distributed", update_distributed),
        ("/v1/update_weights_from_shm", update_shm),
        ("/v1/update_weights_from_ipc", update_ipc),
        ("/v1/commit_weights", commit),
        ("/v1/abort_staged", abort),
        ("/v1/fence", fence),
        ("/init_weights_update_group", sgl_init),
        ("/destroy_weights_update_group", sgl_destroy),
        ("/update_weights_from_distributed", sgl_update),
    ]
    # A failed operation answers SGLang's {success: false, message}; a body that does not parse
    # answers Tidal's error object, like every route.
    sglang_reply = {
        "description": "SGLang's {success: false, message} when the operation fails; Tidal's error "
        "object when the body does not parse",
        "content": {
            "application/json": {
                "schema": {"anyOf": [{"$ref": "#/components/schemas/ErrorResponse"}, SGLangReply.model_json_schema()]}
            }
        },
    }
    for path, handler in routes:
        sglang = not path.startswith("/v1/")
        responses = {**CONTROL_ERRORS, 400: sglang_reply} if sglang else CONTROL_ERRORS
        app.post(path, dependencies=admin, responses=responses)(handler)
