"""The control plane over HTTP (DESIGN.md §5, §6): pause, resume, abort, sleep, wake, update
from disk, flush, state; and /health, /metrics."""

from __future__ import annotations

import os
from typing import Any, Literal

from fastapi import FastAPI, Query
from fastapi.responses import Response

from tidal.server import schemas as S
from tidal.server.errors import APIError, error_responses
from tidal.server.metrics import CONTENT_TYPE_LATEST
from tidal.server.service import CONTROL_ERRORS, ServerCore, json_response


class ControlRoutes:
    """Tidal's own control routes (/v1/...) and the ops routes."""

    def __init__(self, core: ServerCore) -> None:
        self.core = core

    def register(self, app: FastAPI, admin: list) -> None:
        control: dict[str, Any] = dict(dependencies=admin, responses=CONTROL_ERRORS)
        app.post("/v1/pause", **control)(self.pause)
        app.post("/v1/resume", **control)(self.resume)
        app.get("/v1/is_paused", **control)(self.is_paused)
        app.post("/v1/abort_requests", **control)(self.abort_requests)
        app.post("/v1/sleep", **control)(self.sleep)
        app.post("/v1/wake_up", **control)(self.wake_up)
        app.post("/v1/update_weights", **control)(self.update_weights)
        app.post("/v1/flush_cache", **control)(self.flush_cache)
        app.get("/v1/state", **control)(self.state)
        # ops; HEAD for load balancers
        app.get("/health", responses=error_responses(503), operation_id="health")(self.health)
        app.head("/health", responses=error_responses(503), operation_id="health_head")(self.health)
        app.get("/metrics", responses={200: {"description": "Prometheus text format.", "content": {"text/plain": {}}}})(
            self.metrics_endpoint
        )

    async def health(self) -> Response:
        if self.core.client is None:
            return json_response({"status": "unhealthy", "reason": "engine core is not running"}, 503)
        h = self.core.client.health()
        self.core.metrics.set_health(h.ok)
        body = {"status": "ok" if h.ok else "unhealthy", "reason": h.reason, **h.detail}
        return json_response(body, 200 if h.ok else 503)

    async def metrics_endpoint(self) -> Response:
        if self.core.client is not None:
            self.core.metrics.set_health(self.core.client.health().ok)
        return Response(self.core.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def pause(
        self,
        body: S.PauseRequest | None = None,
        mode: Literal["abort", "retract", "keep", "drain"] | None = Query(
            None, description="the same as the body's mode (vLLM's form); not both"
        ),
        timeout_s: float | None = Query(
            None, ge=0.0, le=7 * 86400, description="the same as the body's timeout_s; not both"
        ),
    ) -> Response:
        if mode is not None or timeout_s is not None:
            if body is not None:
                raise APIError(
                    400,
                    "pause options were given both in the query and in the body: expected one of them",
                    param="mode" if mode is not None else "timeout_s",
                )
            body = S.PauseRequest(mode=mode or "abort", timeout_s=timeout_s)
        body = body or S.PauseRequest()
        return await self.core.control(lambda: self.core.engine.pause(body.mode, body.timeout_s))

    async def resume(self, body: S.ControlRequest | None = None) -> Response:
        body = body or S.ControlRequest()
        return await self.core.control(lambda: self.core.engine.resume(body.timeout_s))

    async def is_paused(self) -> Response:
        async def call() -> dict:
            st = await self.core.engine.state()
            return {"is_paused": st["state"] != "serving", "state": st["state"], "pause_mode": st.get("pause_mode")}

        return await self.core.control(call)

    async def abort_requests(self, body: S.AbortRequest) -> Response:
        if body.abort_all == (body.request_ids is not None):
            raise APIError(400, "give exactly one of request_ids or abort_all=true", param="request_ids")
        ids = None if body.abort_all else body.request_ids
        return await self.core.control(lambda: self.core.engine.abort(ids, body.timeout_s))

    async def sleep(self, body: S.SleepRequest | None = None) -> Response:
        body = body or S.SleepRequest()
        return await self.core.control(lambda: self.core.engine.sleep(body.tags, body.discard, body.timeout_s))

    async def wake_up(self, body: S.WakeUpRequest | None = None) -> Response:
        body = body or S.WakeUpRequest()
        return await self.core.control(lambda: self.core.engine.wake_up(body.tags, body.timeout_s))

    async def update_weights(self, body: S.UpdateWeightsRequest) -> Response:
        path = self._weights_path(body.path)
        timeout = body.timeout_s or max(self.core.settings.control_timeout_s, 600.0)
        engine = self.core.engine
        return await self.core.control(
            lambda: engine.update_weights(
                path, version=body.version, checksums=body.checksums, timeout_s=timeout, staging=body.staging
            )
        )

    def _weights_path(self, path: str) -> str:
        if "\x00" in path:
            raise APIError(400, "path contains a NUL byte", param="path")
        real = os.path.realpath(path)
        root = self.core.settings.weights_root
        if root is not None:
            root = os.path.realpath(root)
            if os.path.commonpath([real, root]) != root:
                raise APIError(
                    403,
                    f"path={path!r} is outside the allowed weights root {root!r} (--weights-root)",
                    "permission_error",
                    "path",
                )
        if not os.path.isdir(real):
            raise APIError(
                400, f"path={path!r} is not a directory: expected an HF/safetensors checkpoint directory", param="path"
            )
        return real

    async def flush_cache(self, body: S.ControlRequest | None = None) -> Response:
        body = body or S.ControlRequest()
        return await self.core.control(lambda: self.core.engine.flush_cache(body.timeout_s))

    async def state(self) -> Response:
        return await self.core.control(lambda: self.core.engine.state())
