"""What crosses the ZeroMQ boundary between the API server and the engine core process.

Every message is two frames: a one-byte kind and a msgpack payload (msgspec). Requests and
outputs reuse the engine's own dataclasses (`AddRequest`, `EngineOutput`), control operations
the typed messages of engine/control_ops.py (one tagged union, aborts included); a control
call carries a `call_id` where in-process it carries a Future.

    client -> engine   ADD AddRequest | CONTROL ControlCallMsg | SHUTDOWN
    engine -> client   READY Ready | FAILED Failed | OUTPUTS OutputBatch | REPLY Reply | HEARTBEAT Heartbeat
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

import msgspec

from tidal.engine.control_ops import WIRE_OPS, ControlOp, enc_hook
from tidal.engine.messages import AddRequest, EngineOutput

# client -> engine
ADD = b"a"
CONTROL = b"c"
SHUTDOWN = b"q"
# engine -> client
READY = b"R"
FAILED = b"F"
OUTPUTS = b"O"
REPLY = b"P"
HEARTBEAT = b"H"


if TYPE_CHECKING:
    WireOp = ControlOp
else:  # msgspec decodes the tagged union of every op a client may send
    WireOp = Union[WIRE_OPS]  # noqa: UP007 (built from a tuple)


class ControlCallMsg(msgspec.Struct, array_like=True):
    call_id: int  # 0: fire and forget (no reply is sent)
    op: WireOp


class Reply(msgspec.Struct, array_like=True):
    """`result`: the op's result Struct as sent, its JSON form as received."""

    call_id: int
    result: Any = None
    error: str | None = None
    error_type: str | None = None  # "EngineError" | "EngineDead" | ...
    stats: dict[str, Any] | None = None


class OutputBatch(msgspec.Struct, array_like=True):
    outputs: list[EngineOutput]
    step_count: int
    step_time_s: float


class Heartbeat(msgspec.Struct, array_like=True):
    """Sent by the engine process every `interval`. `probe_age_s` is how long the oldest
    unanswered liveness probe (a no-op through the core's inbox) has waited: a busy core
    answers within one step, a stuck one never does."""

    time: float
    core_alive: bool
    state: str
    error: str | None
    probe_age_s: float
    stats: dict[str, Any] | None


class Ready(msgspec.Struct, array_like=True):
    pid: int
    model_path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    config: dict[str, Any]


class Failed(msgspec.Struct, array_like=True):
    reason: str


_encoder = msgspec.msgpack.Encoder(enc_hook=enc_hook)
encode = _encoder.encode

DECODERS: dict[bytes, msgspec.msgpack.Decoder] = {
    ADD: msgspec.msgpack.Decoder(AddRequest),
    CONTROL: msgspec.msgpack.Decoder(ControlCallMsg),
    READY: msgspec.msgpack.Decoder(Ready),
    FAILED: msgspec.msgpack.Decoder(Failed),
    OUTPUTS: msgspec.msgpack.Decoder(OutputBatch),
    REPLY: msgspec.msgpack.Decoder(Reply),
    HEARTBEAT: msgspec.msgpack.Decoder(Heartbeat),
}


def decode(kind: bytes, payload: bytes) -> Any:
    dec = DECODERS.get(kind)
    if dec is None:
        raise ValueError(f"message kind {kind!r} is unknown: expected one of {sorted(DECODERS)}")
    return dec.decode(payload)
