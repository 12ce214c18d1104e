"""The typed control surface (engine/control_ops.py): every op message and result serialises
the same way over the ZeroMQ codec, to JSON and in-process; bad values name their field; one
deadline rule; and every op is defined once and reachable from LLM, AsyncLLM and EngineClient."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from tidal import LLM, AsyncLLM
from tidal.config import EngineConfig
from tidal.engine import control_ops as ops
from tidal.engine.client import ControlAPI
from tidal.engine.control import ControlPlane
from tidal.engine.messages import EngineInvalidInput
from tidal.server import protocol as P
from tidal.server.engine_client import EngineClient

_SUM = [ops.RequestSummary("r-1", 0, 3)]
_TENSORS = [{"name": "w", "dtype": "float32", "shape": [2, 3]}]

# One message per op, with its fields away from their defaults.
MESSAGES: dict[type[ops.ControlOp], ops.ControlOp] = {
    ops.Pause: ops.Pause(mode="drain", timeout_s=2.5),
    ops.Resume: ops.Resume(),
    ops.Abort: ops.Abort(request_ids=["a", "b"]),
    ops.Sleep: ops.Sleep(tags=["kv_cache"], discard=True),
    ops.WakeUp: ops.WakeUp(tags=["weights"]),
    ops.UpdateWeights: ops.UpdateWeights(
        source="distributed",
        version=3,
        checksums={"w": "0" * 64},
        group_name="g",
        layout="bucketed",
        buckets=[{"nbytes": 24, "tensors": _TENSORS}],
        commit=False,
        staging="in_place",
        timeout_s=9.0,
    ),
    ops.InitWeightTransfer: ops.InitWeightTransfer(
        master_address="127.0.0.1",
        master_port=29500,
        rank_offset=1,
        world_size=2,
        group_name="g",
        backend="gloo",
        timeout_s=5.0,
    ),
    ops.DestroyWeightTransfer: ops.DestroyWeightTransfer(group_name="g"),
    ops.CheckWeights: ops.CheckWeights(tensors=_TENSORS),
    ops.CommitWeights: ops.CommitWeights(version=4),
    ops.AbortStaged: ops.AbortStaged(),
    ops.Fence: ops.Fence(reason="replica 2 failed its commit"),
    ops.FlushCache: ops.FlushCache(),
    ops.State: ops.State(),
}

# One result per op (UNSET fields set where an op's reply has them).
RESULTS: dict[type[ops.ControlOp], ops.OpResult] = {
    ops.Pause: ops.PauseResult(mode="drain", finished=_SUM, state="serving", superseded_by="resume", elapsed_s=0.1),
    ops.Resume: ops.ResumeResult(state="serving", changed=True, released_held=2, elapsed_s=0.0),
    ops.Abort: ops.AbortResult(aborted=["a"], unknown=["b"], num_aborted_samples=2),
    ops.Sleep: ops.SleepResult(
        tags=["kv_cache"],
        bytes_freed={"kv_cache": 4096},
        retracted=_SUM,
        state="sleeping",
        sleeping=["kv_cache"],
        elapsed_s=0.2,
    ),
    ops.WakeUp: ops.WakeUpResult(tags=["kv_cache"], bytes_restored={"kv_cache": 4096}, state="paused", sleeping=[]),
    ops.UpdateWeights: ops.WeightsResult(
        weight_version=3,
        num_tensors=5,
        bytes=100,
        stage_s=0.5,
        commit_s=0.1,
        skipped=False,
        committed=True,
        recomputed=1,
        staging="copy",
    ),
    ops.InitWeightTransfer: ops.InitTransferResult(group_name="g", rank=1, world_size=2, backend="gloo"),
    ops.DestroyWeightTransfer: ops.DestroyTransferResult(destroyed=False, group_name=None),
    ops.CheckWeights: ops.CheckWeightsResult(ok=True, num_tensors=1, bytes=24),
    ops.CommitWeights: ops.WeightsResult(weight_version=4, skipped=True, reason="already committed"),
    ops.AbortStaged: ops.AbortStagedResult(aborted=True, staged_version=4, weight_version=3),
    ops.Fence: ops.FenceResult(fenced="fenced by the caller: x"),
    ops.FlushCache: ops.FlushCacheResult(flushed=True, elapsed_s=0.0),
    ops.State: ops.StateResult(
        state="paused",
        pause_mode="keep",
        weight_version=2,
        num_running=0,
        num_waiting=1,
        num_held=0,
        kv_blocks_used=3,
        kv_blocks_total=64,
        memory_bytes={"kv_cache": 1, "weights": 2},
        sleeping=[],
        weights_loaded=True,
        step_count=7,
        overlapped_steps=3,
        last_step_time_s=0.01,
        num_preemptions=0,
        prefix_cache_hit_tokens=4,
        prefix_cache_query_tokens=8,
        control_ops={"pause": 1},
        control_op_seconds={"pause": 0.1},
        fenced=None,
        weight_transfer={"group": None, "busy": None},
        last_control_op={"op": "pause", "result": {"mode": "keep", "kept": []}, "at": 1.0},
    ),
}

# A call of each client method, by op name.
CALLS: dict[str, tuple] = {
    "pause": ("drain", 2.5),
    "resume": (),
    "abort": (["a"],),
    "sleep": (["kv_cache"],),
    "wake_up": (None,),
    "update_weights": ("/ckpt",),
    "init_weight_transfer": ("127.0.0.1", 29500, 1, 2, "g"),
    "destroy_weight_transfer": ("g",),
    "check_weights": (_TENSORS,),
    "commit_weights": (4,),
    "abort_staged": (),
    "fence": ("why",),
    "flush_cache": (),
    "state": (),
}


def test_every_op_has_a_sample_a_handler_and_one_client_method():
    public = {
        c for c in vars(ops).values() if isinstance(c, type) and issubclass(c, ops.ControlOp) and c is not ops.ControlOp
    }
    assert public - set(ops.WIRE_OPS) == {ops.WeightsDone}  # the only op that never leaves the process
    assert set(MESSAGES) == set(RESULTS) == set(ops.WIRE_OPS)
    assert set(CALLS) == set(ops.OPS_BY_NAME)
    assert set(ControlPlane.HANDLERS) == set(ops.WIRE_OPS) | {ops.WeightsDone}
    for name in ops.OPS_BY_NAME:
        assert name in vars(ControlAPI), f"ControlAPI has no method for op {name!r}"


@pytest.mark.parametrize("op_type", ops.WIRE_OPS, ids=lambda t: t.__struct_config__.tag)
def test_message_round_trips_zeromq_and_json(op_type):
    op = MESSAGES[op_type]
    wire = P.decode(P.CONTROL, P.encode(P.ControlCallMsg(11, op)))
    assert wire.call_id == 11 and type(wire.op) is op_type and wire.op == op
    as_json = msgspec.json.encode(op)
    assert json.loads(as_json)["op"] == op.name
    assert msgspec.json.decode(as_json, type=op_type) == op


@pytest.mark.parametrize("op_type", ops.WIRE_OPS, ids=lambda t: t.__struct_config__.tag)
def test_result_round_trips_zeromq_and_json_with_one_shape(op_type):
    result = RESULTS[op_type]
    assert isinstance(result, op_type.result)
    shape = ops.result_dict(result)  # what an in-process client returns
    reply = P.decode(P.REPLY, P.encode(P.Reply(5, result=result)))
    assert reply.result == shape  # what EngineClient returns
    assert json.loads(msgspec.json.encode(result)) == shape  # what an HTTP route answers
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(result), type=op_type.result) == result
    assert msgspec.convert(shape, op_type.result) == result
    assert all(v is not msgspec.UNSET for v in shape.values())


def test_unset_fields_leave_the_reply_and_unknown_keys_are_refused():
    assert ops.result_dict(ops.ResumeResult(state="serving", changed=False)) == {"state": "serving", "changed": False}
    with pytest.raises(msgspec.ValidationError, match="unknown field `surprise`"):
        ops.as_result(ops.Resume(), {"state": "serving", "changed": False, "surprise": 1})


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: ops.Pause(mode="bogus"), "mode"),
        (lambda: ops.Sleep(tags=["kv_cache", "gpu"]), "tags"),
        (lambda: ops.WakeUp(tags="weights"), "tags"),
        (lambda: ops.UpdateWeights(source="ftp"), "source"),
        (lambda: ops.UpdateWeights(path="/x", staging="lazy"), "staging"),
        (lambda: ops.UpdateWeights(source="distributed", layout="packed"), "layout"),
        (
            lambda: ops.InitWeightTransfer(
                master_address="h", master_port=1, rank_offset=1, world_size=2, group_name="g", backend="mpi"
            ),
            "backend",
        ),
    ],
)
def test_bad_values_name_their_field(make, field):
    with pytest.raises(EngineInvalidInput) as e:
        make()
    assert e.value.field == field and str(e.value).startswith(f"{field}=")


def test_a_bad_value_over_the_wire_names_its_field():
    raw = msgspec.msgpack.encode([3, {"op": "pause", "mode": "bogus", "timeout_s": None}])
    with pytest.raises(msgspec.ValidationError, match="mode"):
        P.decode(P.CONTROL, raw)
    with pytest.raises(msgspec.ValidationError, match="Invalid value 'nope'"):
        P.decode(P.CONTROL, msgspec.msgpack.encode([3, {"op": "nope"}]))


def test_in_process_tensors_are_refused_over_the_wire():
    op = ops.UpdateWeights(named_tensors={"w": object()})
    with pytest.raises(EngineInvalidInput) as e:
        op.check_wire()
    assert e.value.field == "named_tensors"
    ops.UpdateWeights(path="/ckpt").check_wire()


def test_one_deadline_rule():
    grace, default = ops.DEADLINE_GRACE_S, 7.0
    wait = ops.reply_wait_s
    assert wait(ops.Pause(mode="drain", timeout_s=3.0), None, default) == 3.0 + grace
    assert wait(ops.Pause(mode="drain"), None, default) == default  # the engine's 30 s drain is shorter
    assert wait(ops.Pause(mode="abort"), None, default) == default
    assert wait(ops.Pause(mode="abort"), 2.0, default) == 2.0
    assert wait(ops.UpdateWeights(path="/x"), 1.0, default) == 1.0
    assert (
        wait(
            ops.InitWeightTransfer(
                master_address="h", master_port=1, rank_offset=1, world_size=2, group_name="g", timeout_s=4.0
            ),
            None,
            default,
        )
        == 4.0 + grace
    )
    assert wait(ops.UpdateWeights(path="/x", timeout_s=20.0), None, default) == 20.0 + grace
    assert wait(ops.State(), None, default) == default and wait(ops.State(), 0.5, default) == 0.5


def _recording(cls):
    """An instance of `cls` whose transport records what it is given instead of sending it."""
    obj = cls.__new__(cls)
    obj.control_timeout_s = 42.0
    obj._paused_for_sleep = False  # LLM's vLLM-form sleep bookkeeping
    sent: list[tuple[ops.ControlOp, float]] = []

    def transport(op, wait_s):
        sent.append((op, wait_s))
        return {"sleeping": []}

    obj._control = transport
    return obj, sent


@pytest.mark.parametrize("cls", [LLM, AsyncLLM, EngineClient])
def test_every_op_is_reachable_from_each_client_through_the_one_definition(cls):
    obj, sent = _recording(cls)
    for name, args in CALLS.items():
        method = getattr(cls, name)
        # The one definition, or (LLM's vLLM-compatible sleep/wake_up) a thin wrapper over it.
        assert method is getattr(ControlAPI, name) or (cls is LLM and name in ("sleep", "wake_up")), name
        getattr(obj, name)(*args)
        op, wait_s = sent[-1]
        assert type(op) is ops.OPS_BY_NAME[name]
        assert wait_s == ops.reply_wait_s(op, None, 42.0)


class _Socket:
    """Stands in for EngineClient's PUSH socket: decodes what is sent, as the engine would."""

    def __init__(self) -> None:
        self.sent: list[P.ControlCallMsg] = []

    def send_multipart(self, frames, flags=0, copy=True) -> None:
        kind, payload = frames
        assert kind == P.CONTROL
        self.sent.append(P.decode(kind, bytes(payload)))


async def test_engine_client_sends_each_op_over_the_codec_and_returns_the_reply():
    client = EngineClient(EngineConfig())
    client._to_engine = _Socket()
    for name, args in CALLS.items():
        before = len(client._to_engine.sent)
        task = asyncio.ensure_future(getattr(client, name)(*args))
        for _ in range(100):  # the call registers its reply and sends within its first steps
            if len(client._to_engine.sent) > before:
                break
            await asyncio.sleep(0)
        msg = client._to_engine.sent[-1]
        assert len(client._to_engine.sent) == before + 1 and msg.call_id in client._calls
        assert type(msg.op) is ops.OPS_BY_NAME[name]
        result = ops.result_dict(RESULTS[type(msg.op)])
        client._calls[msg.call_id].set_result(P.decode(P.REPLY, P.encode(P.Reply(msg.call_id, result))).result)
        assert await asyncio.wait_for(task, 5.0) == result
    assert client._calls == {}  # every reply channel is gone once its call returned
