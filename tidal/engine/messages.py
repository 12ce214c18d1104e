"""Messages into the core loop's inbox and out of its outbox. Plain dataclasses so that the
server can carry them over ZeroMQ with msgspec unchanged; the control operations themselves
are typed messages in engine/control_ops.py."""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass

from tidal.engine.control_ops import ControlOp, PauseMode  # noqa: F401 (PauseMode: re-exported)
from tidal.errors import EngineDead, EngineError, EngineInvalidInput, EngineNotServing  # noqa: F401 (re-exported)
from tidal.sampling_params import SamplingParams


class EngineState(str, enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    PAUSED = "paused"
    SLEEPING = "sleeping"
    UPDATING = "updating"
    DEAD = "dead"


@dataclass(slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    final_only: bool = False  # emit nothing until the request finishes (offline generate)
    # The last K prompt tokens are earlier output of this same sample (engine/request.py).
    prior_output_tokens: int = 0


@dataclass(slots=True)
class ControlCall:
    """A control operation in the inbox; the core thread completes `reply` with its result
    (a control_ops result Struct) or its exception."""

    op: ControlOp
    reply: Future | None = None


@dataclass(slots=True)
class Shutdown:
    pass


@dataclass(slots=True)
class EngineOutput:
    """New tokens of one sample since the last output, and whether it ended."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    weight_version: int = 0
    weight_spans: list[tuple[int, int, int]] | None = None  # (version, start, end), on finish
    num_prompt_tokens: int = 0
    error: str | None = None  # set when the request was rejected or the engine died
    # Why `error` is set, so clients map it without reading the message text:
    # "invalid_input" (a 400: `error_param` names the field), "not_serving", "engine_dead".
    error_type: str | None = None
    error_param: str | None = None
    new_ranks: list[int] | None = None  # with new_logprobs: each token's rank (1: the most likely)
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    # Sample 0 of a request with SamplingParams.prompt_logprobs, once (when its prompt is scored,
    # or at its end): prompt tokens 1.. in order (token 0 has no prefix).
    prompt_logprobs: list[float] | None = None
    prompt_ranks: list[int] | None = None
    prompt_top_logprobs: list[dict[int, float]] | None = None
