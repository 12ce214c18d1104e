"""The engine core process: an EngineCore behind two ZeroMQ sockets (DESIGN.md §1).

    main thread (intake)   PULL  -> decode -> core.submit(...)
    core thread            outputs and control replies -> outbox queue
    outbox thread          outbox queue -> encode -> PUSH
    heartbeat thread       every interval: a liveness probe through the core's inbox, and a
                           Heartbeat (core alive? state, how long the probe has waited, stats)

Only the core thread touches engine state. Control replies travel back through a done-callback
on the reply Future; the core completes it on its own thread right after it has handed its
outputs to the outbox, so on the wire an output always precedes the reply that follows it.
The process exits when its parent dies (PR_SET_PDEATHSIG, and a parent-pid check as backup).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import zmq

from tidal.engine.control_ops import Abort, result_dict
from tidal.engine.messages import ControlCall, EngineInvalidInput
from tidal.server import protocol as P

if TYPE_CHECKING:
    from tidal.engine.core import EngineCore

log = logging.getLogger("tidal.engine_proc")


def run_engine_process(
    config_kwargs: dict[str, Any],
    in_addr: str,
    out_addr: str,
    parent_pid: int,
    heartbeat_s: float = 0.5,
    log_level: str = "INFO",
) -> None:
    """Entry point of the spawned process. Returns (exits) when told to shut down or when the
    parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops us
    _die_with_parent()
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s [engine %(process)d] %(name)s: %(message)s",
    )
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(out_addr)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(in_addr)
    proc = EngineCoreProc(push, heartbeat_s)
    code = 0
    try:
        if proc.start(config_kwargs):
            proc.serve(pull, parent_pid)
        else:
            code = 1
    except BaseException:  # never leave the client waiting without a word
        log.exception("engine process failed")
        code = 1
    finally:
        proc.close()
        pull.close(0)
        push.close(2000)
        ctx.term()
    sys.exit(code)


class EngineCoreProc:
    def __init__(self, push: zmq.Socket, heartbeat_s: float) -> None:
        self.push = push
        self.heartbeat_s = heartbeat_s
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.core: EngineCore | None = None
        self.stats: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._outbox_thread = threading.Thread(target=self._send_loop, name="tidal-outbox", daemon=True)
        self._outbox_thread.start()
        self._hb_thread: threading.Thread | None = None

    # -- startup -------------------------------------------------------------------------
    def start(self, config_kwargs: dict[str, Any]) -> bool:
        try:
            from tidal.config import EngineConfig
            from tidal.engine.core import EngineCore

            config = EngineConfig(**config_kwargs)
            core = EngineCore(config, self._on_outputs)
            self.core = core
            core.start()
        except BaseException as e:
            log.error("engine failed to start: %s\n%s", e, traceback.format_exc())
            self.outbox.put((P.FAILED, P.Failed(f"{type(e).__name__}: {e}")))
            return False
        cfg = {f: getattr(config, f) for f in config.__slots__}
        self.outbox.put(
            (
                P.READY,
                P.Ready(
                    os.getpid(),
                    core.model_path,
                    core.max_model_len,
                    core.runner.arch.vocab_size,
                    list(core.eos_token_ids),
                    cfg,
                ),
            )
        )
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="tidal-heartbeat", daemon=True)
        self._hb_thread.start()
        # The server logs "engine core ready" once it has the tokenizer too; saying it here as well doubled it.
        log.debug("engine core started: %s (max_model_len=%d)", core.model_path, core.max_model_len)
        return True

    def _started(self) -> EngineCore:
        if self.core is None:
            raise RuntimeError("the engine core has not started: start() failed or was not called")
        return self.core

    # -- intake (main thread) ------------------------------------------------------------
    def serve(self, pull: zmq.Socket, parent_pid: int) -> None:
        core = self._started()
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        while True:
            if not poller.poll(200):
                if os.getppid() != parent_pid:
                    log.warning("parent process %d is gone; exiting", parent_pid)
                    return
                continue
            kind, payload = pull.recv_multipart()
            if kind == P.SHUTDOWN:
                log.info("shutdown requested")
                return
            try:
                msg = P.decode(kind, payload)
            except Exception as e:  # a client bug; say so rather than die
                self._reject_undecodable(kind, payload, e)
                continue
            if kind == P.ADD:
                core.submit(msg)
            elif kind == P.CONTROL:
                self._submit_control(msg)

    def _submit_control(self, msg: P.ControlCallMsg) -> None:
        reply = self._reply_future(msg.call_id)
        try:
            msg.op.check_wire()  # in-process-only fields never arrive set from a client
        except EngineInvalidInput as e:
            reply.set_exception(e)
            return
        self._started().submit(ControlCall(msg.op, reply))

    def _reply_future(self, call_id: int) -> Future:
        fut: Future = Future()
        if call_id:  # call_id 0: fire and forget (a disconnected client's abort)
            fut.add_done_callback(lambda f: self._on_reply(call_id, f))
        return fut

    def _reject_undecodable(self, kind: bytes, payload: bytes, err: Exception) -> None:
        import msgspec

        from tidal.engine.messages import EngineOutput

        log.error("could not decode a %r message: %s", kind, err)
        try:
            raw = msgspec.msgpack.decode(payload)
        except Exception:
            return
        if kind == P.ADD and isinstance(raw, dict) and isinstance(raw.get("request_id"), str):
            n = (raw.get("params") or {}).get("n", 1)
            n = n if isinstance(n, int) and 0 < n <= 1024 else 1
            self.outbox.put(
                (
                    P.OUTPUTS,
                    P.OutputBatch(
                        [
                            EngineOutput(
                                raw["request_id"],
                                i,
                                [],
                                finish_reason="abort",
                                error=f"invalid request: {err}",
                                error_type="invalid_input",
                            )
                            for i in range(n)
                        ],
                        0,
                        0.0,
                    ),
                )
            )
        elif isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], int):
            self.outbox.put((P.REPLY, P.Reply(raw[0], error=f"invalid message: {err}", error_type="EngineError")))

    # -- the core thread's side ----------------------------------------------------------
    def _on_outputs(self, outputs) -> None:
        core = self.core
        self.outbox.put(
            (P.OUTPUTS, P.OutputBatch(outputs, core.step_count if core else 0, core.last_step_time if core else 0.0))
        )

    def _on_reply(self, call_id: int, fut: Future) -> None:
        stats = self._snapshot()
        exc = fut.exception()
        if exc is None:
            reply = P.Reply(call_id, result=fut.result(), stats=stats)
        else:
            reply = P.Reply(call_id, error=str(exc), error_type=type(exc).__name__, stats=stats)
            if isinstance(exc, EngineInvalidInput):  # the field survives the trip (as data, never pickled)
                reply.result = {"field": exc.field, "value": exc.value, "expected": exc.expected}
        self.outbox.put((P.REPLY, reply))

    def _snapshot(self) -> dict[str, Any] | None:
        # Runs where the reply is completed: the core thread (or anywhere once the core is dead).
        try:
            snap = result_dict(self._started().control.snapshot())
            snap.pop("last_control_op", None)
            self.stats = snap
            return snap
        except Exception:
            return self.stats

    # -- heartbeat -----------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        core = self._started()
        probe: Future | None = None
        sent = 0.0
        while not self._stop.wait(self.heartbeat_s):
            now = time.monotonic()
            if probe is None or probe.done():
                probe, sent = Future(), now
                probe.add_done_callback(lambda f: self._snapshot())
                core.submit(ControlCall(Abort(request_ids=[]), probe))  # a no-op the loop must answer
            self.outbox.put(
                (
                    P.HEARTBEAT,
                    P.Heartbeat(
                        time.time(),
                        core.alive,
                        core.state.value,
                        core.error,
                        0.0 if probe.done() else now - sent,
                        self.stats,
                    ),
                )
            )

    # -- outbox --------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            item = self.outbox.get()
            if item is None:
                return
            kind, msg = item
            try:
                self.push.send_multipart([kind, P.encode(msg)], copy=False)
            except zmq.ZMQError as e:
                log.error("send failed: %s", e)
                return
            except Exception:  # an unencodable result must not kill the outbox
                log.exception("could not encode a %r message", kind)
                if kind == P.REPLY:
                    self.outbox.put(
                        (P.REPLY, P.Reply(msg.call_id, error="reply could not be encoded", error_type="EngineError"))
                    )

    def close(self) -> None:
        self._stop.set()
        if self.core is not None:
            self.core.shutdown(timeout_s=10.0)  # ends every request: their outputs go out first
        if self._hb_thread is not None:
            self._hb_thread.join(2.0)
        self.outbox.put(None)
        self._outbox_thread.join(5.0)


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:  # the parent-pid check in serve() still covers us
        pass
