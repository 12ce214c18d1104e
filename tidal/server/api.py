"""The HTTP server (DESIGN.md §6): assembles one FastAPI app from the route module of each API
surface over one ServerCore (service.py): openai_routes, generate_routes, control_routes,
weight_routes, vllm_routes. Here: the outermost ASGI gate (body limit, request counting, the
router's many-requests channel of mux.py), error handlers, the OpenAPI document.

Status codes are listed in tidal/server/errors.py. A streaming response sends its headers only
once the first output is there, so a request that fails before any token still gets a real
status code; a later failure is an SSE `error` event.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tidal.config import EngineConfig
from tidal.server import weight_routes
from tidal.server.control_routes import ControlRoutes
from tidal.server.errors import APIError, engine_error
from tidal.server.generate_routes import GenerateRoutes
from tidal.server.metrics import ServerMetrics
from tidal.server.mux import MUX_PATH, MuxServer
from tidal.server.openai_routes import OpenAIRoutes
from tidal.server.service import ServerCore, ServerSettings, WeightLabels
from tidal.server.sglang_routes import SGLangRoutes
from tidal.server.vllm_routes import VLLMRoutes

__all__ = ["ServerSettings", "create_app"]


class _BodyTooLarge(Exception):
    pass


class _HTTPGate:
    """Outermost ASGI layer: refuses bodies over the limit (413) and counts every answer by
    route and status in tidal_http_requests_total."""

    def __init__(self, app, metrics: ServerMetrics, max_body_bytes: int, channels: set) -> None:
        self.app, self.metrics, self.limit, self.channels = app, metrics, max_body_bytes, channels

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if (
            scope["path"] == MUX_PATH and scope["method"] == "POST"
        ):  # a router's channel: each request in it comes back here
            return await MuxServer(self, scope, receive, send, self.limit).run(self.channels)
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
    return APIError(
        413, f"the request body is over {limit} bytes: expected at most {limit} (--max-body-bytes)", param="body"
    )


def create_app(engine_config: EngineConfig, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    server = ServerCore(engine_config, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(
        title="Tidal",
        version="0.1.0",
        lifespan=lifespan,
        strict_content_type=False,
        redirect_slashes=False,
        description="OpenAI-compatible and RL-native generation with a control plane. "
        'Errors answer {"error": {message, type, param, code}}.',
    )
    app.state.server = server
    _install(app, server)
    # Bad input answers 400 here, never 422; replacing app.openapi is FastAPI's documented hook.
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    app.add_middleware(
        _HTTPGate, metrics=server.metrics, max_body_bytes=settings.max_body_bytes, channels=server.channels
    )
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


def _install(app: FastAPI, core: ServerCore) -> None:
    user = [Depends(core.require_api_key)]
    admin = [Depends(core.require_admin_key)]
    _install_errors(app)
    labels = WeightLabels()
    OpenAIRoutes(core).register(app, user)
    generate = GenerateRoutes(core, labels)
    generate.register(app, user)
    control = ControlRoutes(core)
    control.register(app, admin)
    SGLangRoutes(core, generate, control, labels).register(app, user, admin)
    weight_routes.register(app, core, labels)
    VLLMRoutes(core, labels).register(app, user, admin)


def _install_errors(app: FastAPI) -> None:
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
        if isinstance(x, str) and x[:1].isupper():  # a union member's model name, not a field
            continue
        parts.append(str(x))
    return ".".join(parts) or "body"


def _validation_api_error(errs: Sequence[Any]) -> APIError:
    if len(errs) == 1 and errs[0].get("type") == "json_invalid":
        pos = errs[0]["loc"][-1]
        reason = (errs[0].get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"the request body is not valid JSON: {reason} (at character {pos})", param="body")
    if len(errs) == 1 and tuple(errs[0].get("loc", ())) == ("body",) and isinstance(errs[0].get("input"), bytes):
        return APIError(
            400, "the request body must be a JSON object (send 'Content-Type: application/json')", param="body"
        )
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
        return APIError(
            400,
            f"the request body is not valid UTF-8: {cause.reason} at byte {cause.start}: expected UTF-8 JSON",
            param="body",
        )
    if isinstance(cause, RecursionError):
        return APIError(
            400, "the request body nests too deeply: expected JSON nested less than about 1,000 levels", param="body"
        )
    if e.status_code == 404:
        return APIError(
            404, f"no route {request.method} {request.url.path}: see /docs for the routes", "not_found_error"
        )
    if e.status_code == 405:
        return APIError(
            405, f"method {request.method} is not allowed on {request.url.path}", headers=getattr(e, "headers", None)
        )
    return APIError(e.status_code, str(e.detail), headers=getattr(e, "headers", None))
