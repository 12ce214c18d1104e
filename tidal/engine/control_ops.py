"""The control surface (DESIGN.md §5): each control operation as a typed message, its typed
result, and the one rule for how long a client waits for a reply.

A message is a msgspec Struct tagged with its op name (`Pause(mode=..., timeout_s=...)` is
`{"op": "pause", "mode": ..., "timeout_s": ...}`). The same object travels in-process (inside a
`ControlCall` through the core's inbox), over ZeroMQ (msgpack, as one tagged union: never
pickle) and to JSON. A result is a Struct too; every client hands back its builtin form
(`result_dict`), which is also exactly what msgpack carries and what the HTTP routes answer.
Fields that are UNSET are left out, so each reply keeps the keys it has always had.

Adding an operation: its message and result here (and in `WIRE_OPS`), its handler in
`ControlPlane` (engine/control.py), its method in `ControlAPI` (engine/client.py).
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Literal

import msgspec
from msgspec import UNSET, UnsetType

from tidal.errors import EngineInvalidInput

DEFAULT_CONTROL_TIMEOUT_S = 60.0  # a client's wait when neither the call nor the op sets one
DEADLINE_GRACE_S = 10.0  # the reply of an op with an engine deadline comes at most this late
DRAIN_DEFAULT_S = 30.0  # pause(drain) without timeout_s
SLEEP_TAGS = ("kv_cache", "weights")
SOURCES = ("path", "tensors", "distributed", "shm", "ipc")
STAGING = ("copy", "in_place")
LAYOUTS = ("per_tensor", "bucketed")
BACKENDS = ("gloo", "nccl")


class PauseMode(str, enum.Enum):
    ABORT = "abort"
    RETRACT = "retract"
    KEEP = "keep"
    DRAIN = "drain"


Source = Literal["path", "tensors", "distributed", "shm", "ipc"]
Staging = Literal["copy", "in_place"]
Layout = Literal["per_tensor", "bucketed"]
Backend = Literal["gloo", "nccl"]


def pause_mode(value: PauseMode | str) -> PauseMode:
    try:
        return PauseMode(value)
    except ValueError:
        raise EngineInvalidInput("mode", value, f"one of {[m.value for m in PauseMode]}") from None


def _one_of(field: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise EngineInvalidInput(field, value, f"one of {list(choices)}")


def _tags(field: str, tags: list[str] | None) -> list[str] | None:
    if tags is None:
        return None
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise EngineInvalidInput(field, tags, f"a list of tags from {list(SLEEP_TAGS)}")
    bad = [t for t in tags if t not in SLEEP_TAGS]
    if bad:
        raise EngineInvalidInput(field, bad, f"a subset of {list(SLEEP_TAGS)}")
    return list(tags)


# -- results ------------------------------------------------------------------------------------
class OpResult(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`elapsed_s` is filled in by the control plane for every op it records."""

    elapsed_s: float | UnsetType = UNSET


class RequestSummary(msgspec.Struct):
    request_id: str
    index: int
    num_output_tokens: int


class PauseResult(OpResult):
    mode: str
    aborted: list[RequestSummary] = []
    retracted: list[RequestSummary] = []
    kept: list[RequestSummary] = []
    finished: list[RequestSummary] = []
    state: str | UnsetType = UNSET  # unset on a drain's reply that a harder pause overtook
    superseded_by: str | UnsetType = UNSET  # a drain ended by a harder pause or a resume


class ResumeResult(OpResult):
    state: str
    changed: bool
    released_held: int | UnsetType = UNSET


class AbortResult(OpResult):
    aborted: list[str]
    unknown: list[str]
    num_aborted_samples: int


class SleepResult(OpResult):
    tags: list[str]
    bytes_freed: dict[str, int]
    retracted: list[RequestSummary]
    state: str
    sleeping: list[str]


class WakeUpResult(OpResult):
    tags: list[str]
    bytes_restored: dict[str, int]
    state: str
    sleeping: list[str]


class WeightsResult(OpResult):
    """update_weights and commit_weights: skipped, staged (commit=False) or committed."""

    weight_version: int
    skipped: bool | UnsetType = UNSET
    reason: str | UnsetType = UNSET
    staged: bool | UnsetType = UNSET
    staged_version: int | UnsetType = UNSET
    num_tensors: int | UnsetType = UNSET
    bytes: int | UnsetType = UNSET
    stage_s: float | UnsetType = UNSET
    commit_s: float | UnsetType = UNSET
    committed: bool | UnsetType = UNSET
    recomputed: int | UnsetType = UNSET  # running requests retracted to recompute their KV
    refreshed: int | UnsetType = UNSET  # running requests that took KV refreshed before the commit
    kv_refresh: dict[str, Any] | UnsetType = UNSET  # its passes, tokens, seconds, how it ended
    staging: str | UnsetType = UNSET


class InitTransferResult(OpResult):
    group_name: str
    rank: int
    world_size: int
    backend: str


class DestroyTransferResult(OpResult):
    destroyed: bool
    group_name: str | None


class CheckWeightsResult(OpResult):
    ok: bool
    num_tensors: int
    bytes: int


class AbortStagedResult(OpResult):
    aborted: bool
    staged_version: int | None
    weight_version: int


class FenceResult(OpResult):
    fenced: str


class FlushCacheResult(OpResult):
    flushed: bool


class StateResult(OpResult):
    state: str
    pause_mode: str | None
    weight_version: int
    num_running: int
    num_waiting: int
    num_held: int
    kv_blocks_used: int
    kv_blocks_total: int
    memory_bytes: dict[str, int]
    sleeping: list[str]
    weights_loaded: bool
    step_count: int
    overlapped_steps: int
    last_step_time_s: float
    num_preemptions: int
    prefix_cache_hit_tokens: int
    prefix_cache_query_tokens: int
    control_ops: dict[str, int]
    control_op_seconds: dict[str, float]
    last_control_op: dict[str, Any] | None
    fenced: str | None
    weight_transfer: dict[str, Any]


# -- messages -----------------------------------------------------------------------------------
class ControlOp(msgspec.Struct, kw_only=True, tag_field="op"):
    result: ClassVar[type[OpResult]]
    recorded: ClassVar[bool] = True  # becomes state()'s last_control_op
    counted: ClassVar[bool] = True  # counted in state()'s control_ops
    local_fields: ClassVar[tuple[str, ...]] = ()  # in-process only: refused over ZeroMQ

    @property
    def name(self) -> str:
        return str(type(self).__struct_config__.tag)

    def deadline_s(self) -> float | None:
        """The engine-side deadline this op was given (its `timeout_s`), for ops that carry one."""
        return None

    def check_wire(self) -> None:
        """Raise when a field that cannot leave this process is set."""
        for f in self.local_fields:
            if getattr(self, f) is not None:
                raise EngineInvalidInput(
                    f,
                    "(in-process objects)",
                    "None over the process boundary: in-process tensors cannot be sent; give path= or a trainer source",
                )


class Pause(ControlOp, tag="pause"):
    result = PauseResult
    mode: PauseMode = PauseMode.ABORT
    timeout_s: float | None = None  # drain: how long in-flight requests may run

    def __post_init__(self) -> None:
        self.mode = pause_mode(self.mode)

    def deadline_s(self) -> float | None:
        return self.timeout_s


class Resume(ControlOp, tag="resume"):
    result = ResumeResult


class Abort(ControlOp, tag="abort"):
    """End these requests (None: every request) with their partial output."""

    result = AbortResult
    recorded = False
    counted = False
    request_ids: list[str] | None = None


class Sleep(ControlOp, tag="sleep"):
    result = SleepResult
    tags: list[str] | None = None  # None: every tag
    discard: bool = False

    def __post_init__(self) -> None:
        self.tags = _tags("tags", self.tags)


class WakeUp(ControlOp, tag="wake_up"):
    result = WakeUpResult
    tags: list[str] | None = None  # None: whatever sleeps

    def __post_init__(self) -> None:
        self.tags = _tags("tags", self.tags)


class UpdateWeights(ControlOp, tag="update_weights"):
    """From a checkpoint directory (path), in-process tensors (named_tensors), or a trainer
    (source="distributed" | "shm" | "ipc"; engine/weights.py)."""

    result = WeightsResult
    local_fields = ("named_tensors",)
    source: Source | None = None
    path: str | None = None
    named_tensors: Any = None
    version: int | None = None
    checksums: dict[str, str] | None = None
    group_name: str | None = None
    tensors: list[dict[str, Any]] | None = None
    layout: Layout = "per_tensor"
    buckets: list[dict[str, Any]] | None = None
    shm_path: str | None = None
    ipc_handles: list[dict[str, Any]] | None = None
    commit: bool = True
    staging: Staging = "copy"
    timeout_s: float | None = None
    flush_cache: bool = True

    def __post_init__(self) -> None:
        if self.source is not None:
            _one_of("source", self.source, SOURCES)
        _one_of("staging", self.staging, STAGING)
        _one_of("layout", self.layout, LAYOUTS)

    def deadline_s(self) -> float | None:
        return self.timeout_s


class InitWeightTransfer(ControlOp, tag="init_weight_transfer"):
    """Join the trainer's process group at rank `rank_offset`."""

    result = InitTransferResult
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: Backend = "gloo"
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        _one_of("backend", self.backend, BACKENDS)

    def deadline_s(self) -> float | None:
        return self.timeout_s


class DestroyWeightTransfer(ControlOp, tag="destroy_weight_transfer"):
    result = DestroyTransferResult
    group_name: str | None = None


class CheckWeights(ControlOp, tag="check_weights"):
    """Check declared names, shapes and dtypes against the model (nothing is loaded)."""

    result = CheckWeightsResult
    tensors: list[dict[str, Any]] | None = None


class CommitWeights(ControlOp, tag="commit_weights"):
    result = WeightsResult
    version: int | None = None


class AbortStaged(ControlOp, tag="abort_staged"):
    result = AbortStagedResult


class Fence(ControlOp, tag="fence"):
    """Refuse generation until an update commits (a trainer's verdict on this replica)."""

    result = FenceResult
    reason: str = "unspecified"


class FlushCache(ControlOp, tag="flush_cache"):
    result = FlushCacheResult


class State(ControlOp, tag="state"):
    result = StateResult
    recorded = False  # or every state() reply would nest the previous one


class WeightsDone(ControlOp, tag="weights_done"):
    """Internal, never on the wire: the weights worker finished `job` (its Future: `outcome`)."""

    recorded = False
    counted = False
    job: Any = None
    outcome: Any = None


# Every op a client may send, as one tagged union (the ZeroMQ decoder's type).
WIRE_OPS: tuple[type[ControlOp], ...] = (
    Pause,
    Resume,
    Abort,
    Sleep,
    WakeUp,
    UpdateWeights,
    InitWeightTransfer,
    DestroyWeightTransfer,
    CheckWeights,
    CommitWeights,
    AbortStaged,
    Fence,
    FlushCache,
    State,
)
OPS_BY_NAME: dict[str, type[ControlOp]] = {str(op.__struct_config__.tag): op for op in WIRE_OPS}


def reply_wait_s(op: ControlOp, timeout_s: float | None, default_s: float = DEFAULT_CONTROL_TIMEOUT_S) -> float:
    """How long a client waits for `op`'s reply, the one rule for every client: an op given an
    engine-side deadline (a drain's or a weight transfer's `timeout_s`) replies by it, so its
    client waits that long plus DEADLINE_GRACE_S and never gives up first; any other call
    (and one whose op left its deadline to the engine's default) waits `timeout_s`, or the
    client's default."""
    deadline = op.deadline_s()
    if deadline is not None:
        return float(deadline) + DEADLINE_GRACE_S
    return default_s if timeout_s is None else float(timeout_s)


def enc_hook(obj: Any) -> Any:
    # Results are plain data; anything exotic (a torch.Size, a set) travels as a list or text.
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    return str(obj)


def result_dict(result: OpResult | dict[str, Any]) -> dict[str, Any]:
    """A result's JSON form: what every client returns and every HTTP route answers."""
    if isinstance(result, dict):
        return result
    return msgspec.to_builtins(result, enc_hook=enc_hook)


def as_result(op: ControlOp, result: OpResult | dict[str, Any]) -> OpResult:
    """`result` as `op`'s result type (a handler may build it as a dict); an unknown key is an
    error, so a result never silently loses a field."""
    if isinstance(result, op.result):
        return result
    return msgspec.convert(result, op.result)
