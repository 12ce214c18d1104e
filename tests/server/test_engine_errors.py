"""Engine errors keep their type across the ZeroMQ boundary: a control reply rebuilds the
exception class raised in the engine process (an EngineInvalidInput with its field, value and
expected), and a request output's error_type picks the exception its caller sees."""
from __future__ import annotations

from concurrent.futures import Future

import pytest
import zmq

from tidal.engine.client import ControlTimeout
from tidal.engine.messages import EngineDead, EngineError, EngineInvalidInput, EngineNotServing, EngineOutput
from tidal.server import protocol as P
from tidal.server.engine_client import _output_error, _reply_error
from tidal.server.engine_proc import EngineCoreProc


def _reply_over_the_wire(exc: BaseException) -> P.Reply:
    """What the engine process sends for a control call that raised `exc`, as the server reads it."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    proc = EngineCoreProc(push, heartbeat_s=1.0)
    try:
        fut: Future = Future()
        fut.set_exception(exc)
        proc._on_reply(7, fut)
        assert pull.poll(10_000), "no reply within 10 s"
        kind, payload = pull.recv_multipart()
        assert kind == P.REPLY
        return P.decode(kind, payload)
    finally:
        proc.close()
        pull.close(0)
        push.close(0)
        ctx.term()


def test_invalid_input_reply_keeps_field_value_and_expected():
    err = _reply_error(_reply_over_the_wire(EngineInvalidInput("n", 200, "at most max_num_seqs=64")))
    assert type(err) is EngineInvalidInput and isinstance(err, ValueError)
    assert (err.field, err.value, err.expected) == ("n", 200, "at most max_num_seqs=64")
    assert str(err) == "n=200 is invalid: expected at most max_num_seqs=64"


@pytest.mark.parametrize("exc", [EngineDead("gone"), EngineNotServing("paused"), ControlTimeout("late"),
                                 EngineError("refused in state paused")])
def test_control_reply_keeps_the_exception_class(exc):
    err = _reply_error(_reply_over_the_wire(exc))
    assert type(err) is type(exc) and str(err) == str(exc)


def test_unknown_reply_error_is_an_engine_error():
    err = _reply_error(_reply_over_the_wire(RuntimeError("boom")))
    assert type(err) is EngineError and str(err) == "boom"


@pytest.mark.parametrize("error_type, param, cls", [
    ("invalid_input", "n", EngineInvalidInput), ("not_serving", None, EngineNotServing),
    ("engine_dead", None, EngineDead)])
def test_output_error_type_picks_the_exception(error_type, param, cls):
    # Messages that would classify differently by their text: only error_type decides.
    out = EngineOutput("r", 0, [], finish_reason="abort", error="rejected: n=65 exceeds max_num_seqs=64",
                       error_type=error_type, error_param=param)
    err = _output_error(out)
    assert type(err) is cls and str(err) == out.error
    if cls is EngineInvalidInput:
        assert err.field == "n"
