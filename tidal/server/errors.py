"""The one error type of the HTTP API and how engine failures map onto it, by exception type
(never by message text).

Status codes: 400 bad input (`param` names the field), 401 missing/wrong key, 403 forbidden
(a weights path outside --weights-root, control without an admin key), 404 unknown model or
route, 405 wrong method, 409 the engine refused a control op in its current state, 413 body over
--max-body-bytes, 503 not serving (paused with --reject-while-paused, engine dead, stuck or
unreachable), 504 deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec
from fastapi.responses import Response
from pydantic import BaseModel

from tidal.engine.client import ControlTimeout
from tidal.engine.messages import EngineDead, EngineError, EngineInvalidInput, EngineNotServing

log = logging.getLogger("tidal.server")
_json = msgspec.json.Encoder().encode


class APIError(Exception):
    """An HTTP error answer: `param` is the body field at fault (None when no field is)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers

    @classmethod
    def invalid(cls, field: str, value: object, expected: str) -> APIError:
        """400 for `field`: says what was sent and what would have been accepted."""
        return cls(400, f"{field}={_short(value)} is invalid: expected {expected}", param=field)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def response(self) -> Response:
        return Response(_json(self.body()), self.status, media_type="application/json", headers=self.headers)


def _short(value: object, limit: int = 80) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} chars)"


# -- the documented error body (OpenAPI) ------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


_WHY = {
    400: "Bad input: `error.param` names the field.",
    401: "Missing or wrong bearer key.",
    403: "Forbidden: a path outside --weights-root, or control without an admin key.",
    404: "Unknown model or route.",
    405: "Method not allowed on this route.",
    409: "The engine refused the control operation in its current state.",
    413: "Request body over --max-body-bytes.",
    503: "Not serving: paused with --reject-while-paused, or the engine is dead, stuck or starting.",
    504: "The request or control call missed its deadline.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with the error body schema."""
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in statuses}


# -- engine failures --------------------------------------------------------------------------
def engine_error(e: BaseException, param: Callable[[str], str] | None = None, deadline: str | None = None) -> APIError:
    """Map what the engine raised to an HTTP error. `param` turns an engine field name into the
    body field that carried it (e.g. prompt -> input_ids on /generate); `deadline` replaces a
    timeout's message with one that names the caller's own deadline."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineInvalidInput):
        return APIError(400, str(e), param=param(e.field) if param else e.field)
    if isinstance(e, EngineNotServing):  # paused with --reject-while-paused, or unreachable for now
        hint = "; retry after resume" if type(e) is EngineNotServing else ""
        return APIError(503, f"{e}{hint}", "engine_not_serving", headers={"Retry-After": "1"})
    if isinstance(e, EngineDead):
        return APIError(503, str(e), "engine_dead", headers={"Retry-After": "5"})
    if isinstance(e, (ControlTimeout, asyncio.TimeoutError, TimeoutError)):
        return APIError(504, deadline or str(e), "timeout")
    if isinstance(e, EngineError):
        return APIError(409, str(e), "engine_error")
    log.error("internal error: %r", e, exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")


def failure_reason(e: BaseException) -> str:
    """The finish_reason label under which a failed request is counted in /metrics."""
    if isinstance(e, EngineNotServing):
        return "rejected"
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    return "error"
