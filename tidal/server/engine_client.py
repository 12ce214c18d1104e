"""EngineClient: the API server's asyncio handle on the engine core process.

The same methods and semantics as AsyncLLM (generate, and every control op of ControlAPI,
engine/client.py), over ZeroMQ instead of a thread.

Why no reply can be lost (docs/architecture.md, "Data flow"): every reply channel, a request's output stream or a
control call's future, is put in the route table *before* its message is sent, and both happen
on the event loop thread with no await in between; the receiver task runs on that same loop,
so it cannot see a reply before the route exists. Routes are removed when the request finishes,
times out, or its caller goes away (which also aborts it in the engine).

Why nothing hangs: every wait has a deadline, and when the engine process dies (its sentinel
fd becomes readable) every open stream and call fails at once with EngineDead. A process that is
alive but answers nothing (stopped, or a core loop stuck in a read) is caught by the heartbeat:
once it is lost, open streams and calls fail with EngineUnavailable and new ones are refused
until the heartbeat returns.

Errors keep their type across the process boundary: a control reply names its exception class
(an EngineInvalidInput also carries field, value and expected), and a request output names its
error kind in `error_type`.

One job past 400 lines: the client of the engine process (requests, control, heartbeat, failure
handling) over one ZeroMQ pair."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import multiprocessing
import os
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from tidal.config import EngineConfig
from tidal.engine import control_ops as ops
from tidal.engine.client import DEFAULT_CONTROL_TIMEOUT_S, ControlAPI, ControlTimeout
from tidal.engine.io import InputProcessor, Prompt, RequestState, check_prior_output_tokens
from tidal.engine.messages import (
    AddRequest,
    EngineDead,
    EngineError,
    EngineInvalidInput,
    EngineNotServing,
    EngineOutput,
)
from tidal.outputs import RequestOutput
from tidal.sampling_params import SamplingParams
from tidal.server import ipc_dir
from tidal.server import protocol as P
from tidal.server.engine_proc import run_engine_process

log = logging.getLogger("tidal.server")


class RequestTimeout(EngineError, TimeoutError):
    """A request did not finish before its deadline; it has been aborted in the engine."""


class EngineUnavailable(EngineNotServing):
    """The engine cannot serve right now but may again: its heartbeat is lost (a stopped or
    stuck process), or the server is shutting down. A 503 with Retry-After, like a rejection
    while paused."""


# Control replies name the exception class raised in the engine process.
_REPLY_ERRORS: dict[str, type[EngineError]] = {
    "EngineDead": EngineDead,
    "EngineNotServing": EngineNotServing,
    "ControlTimeout": ControlTimeout,
}
# Request outputs name the kind of failure (EngineOutput.error_type).
_OUTPUT_ERRORS: dict[str, type[EngineError]] = {"not_serving": EngineNotServing, "engine_dead": EngineDead}


@dataclass(slots=True)
class Health:
    ok: bool
    reason: str
    detail: dict[str, Any]
    # The process is alive but sends nothing (stopped, or its threads frozen): requests fail until
    # it answers. A core loop that is merely slow to read its inbox (a long weight load) is not.
    stalled: bool = False


class _Stream:
    """One request's reply channel: outputs accumulate until the consumer takes them all.
    One timer per request (not one per wait) enforces its deadline."""

    __slots__ = ("items", "waiter", "failure", "expired", "abandoned")

    def __init__(self) -> None:
        self.items: collections.deque[EngineOutput] = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.failure: EngineError | None = None
        self.expired = False
        self.abandoned = False  # its caller is gone; it waits only for the engine's abort

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def put(self, out: EngineOutput) -> None:
        self.items.append(out)
        self._wake()

    def fail(self, error: EngineError) -> None:
        if self.failure is None:
            self.failure = error
        self._wake()

    def expire(self) -> None:
        self.expired = True
        self._wake()

    async def take(self) -> list[EngineOutput]:
        """Everything that has arrived (waits for at least one output, a failure or the
        deadline; raises asyncio.TimeoutError at the deadline)."""
        if not self.items and self.failure is None and not self.expired:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        if not self.items and self.failure is None and self.expired:
            raise asyncio.TimeoutError
        outs = list(self.items)
        self.items.clear()
        return outs


class EngineClient(ControlAPI[Awaitable[dict[str, Any]]]):
    def __init__(
        self,
        config: EngineConfig,
        *,
        request_timeout_s: float = 1800.0,
        control_timeout_s: float = DEFAULT_CONTROL_TIMEOUT_S,
        startup_timeout_s: float = 900.0,
        heartbeat_s: float = 0.5,
        heartbeat_timeout_s: float = 5.0,
        stuck_after_s: float = 60.0,
        log_level: str = "INFO",
        metrics=None,
    ) -> None:
        self.config = config
        self.request_timeout_s = request_timeout_s
        self.control_timeout_s = control_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.heartbeat_s = heartbeat_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.stuck_after_s = stuck_after_s
        self.log_level = log_level
        self.metrics = metrics
        self._routes: dict[str, _Stream] = {}
        self._calls: dict[int, asyncio.Future] = {}  # control calls of callers
        self._aborts: dict[int, asyncio.Future] = {}  # aborts of abandoned requests (see _abandon)
        self._call_ids = itertools.count(1)
        self._req_prefix = uuid.uuid4().hex[:8]
        self._req_ids = itertools.count()
        self._dead: str | None = None
        self._unavailable: str | None = None  # why the engine cannot serve now (heartbeat lost, ...)
        self._draining = False
        self._closing = False
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._tasks: list[asyncio.Task] = []
        self._last_heartbeat = 0.0
        self.heartbeat: P.Heartbeat | None = None
        self.stats: dict[str, Any] = {}
        self.ready: P.Ready | None = None
        self.tokenizer = None
        self.input: InputProcessor | None = None
        self.model_path: str | None = None
        self.max_model_len = 0
        self._tmpdir: str | None = None
        self._ctx: zmq.asyncio.Context | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> EngineClient:
        loop = asyncio.get_running_loop()
        ipc_dir.clean_stale()
        self._tmpdir = ipc_dir.create()
        in_addr = f"ipc://{self._tmpdir}/in"
        out_addr = f"ipc://{self._tmpdir}/out"
        self._ctx = zmq.asyncio.Context()
        self._from_engine = self._ctx.socket(zmq.PULL)
        self._from_engine.setsockopt(zmq.RCVHWM, 0)
        self._from_engine.setsockopt(zmq.LINGER, 0)
        self._from_engine.bind(out_addr)
        # Connecting (not binding) makes the pipe exist at once: sends queue until the engine binds.
        self._to_engine = self._ctx.socket(zmq.PUSH)
        self._to_engine.setsockopt(zmq.SNDHWM, 0)
        self._to_engine.setsockopt(zmq.LINGER, 0)
        self._to_engine.connect(in_addr)
        cfg = {f: getattr(self.config, f) for f in self.config.__slots__}
        mp = multiprocessing.get_context("spawn")
        self._proc = mp.Process(
            target=run_engine_process,
            name="tidal-engine-core",
            daemon=True,
            args=(cfg, in_addr, out_addr, os.getpid(), self.heartbeat_s, self.log_level),
        )
        self._proc.start()
        self._ready: asyncio.Future = loop.create_future()
        loop.add_reader(self._proc.sentinel, self._on_process_exit)
        self._tasks = [
            asyncio.create_task(self._recv_loop(), name="tidal-engine-recv"),
            asyncio.create_task(self._watch_heartbeat(), name="tidal-engine-watch"),
        ]
        # Load the tokenizer while the engine loads the model (both take seconds).
        tokenizer = (
            asyncio.ensure_future(asyncio.to_thread(_try_tokenizer, self.config.model))
            if self.config.model is not None
            else None
        )
        try:
            ready: P.Ready = await asyncio.wait_for(asyncio.shield(self._ready), self.startup_timeout_s)
        except asyncio.TimeoutError:
            await self.shutdown()
            raise EngineDead(f"engine core did not start within {self.startup_timeout_s:.0f}s") from None
        except BaseException:
            await self.shutdown()
            raise
        self.ready = ready
        self.model_path = ready.model_path
        self.max_model_len = ready.max_model_len
        if tokenizer is None or ready.model_path != self.config.model:
            tokenizer = asyncio.ensure_future(asyncio.to_thread(_try_tokenizer, ready.model_path))
        self.tokenizer = await tokenizer
        self.input = InputProcessor(self.tokenizer, ready.max_model_len, ready.vocab_size)
        self._last_heartbeat = time.monotonic()
        return self

    async def shutdown(self, timeout_s: float = 15.0) -> None:
        """Stop the engine process: ask politely, then terminate, then kill. Idempotent."""
        if self._closing:
            return
        self._closing = True
        proc = self._proc
        if proc is not None and proc.is_alive():
            try:
                self._to_engine.send_multipart([P.SHUTDOWN, b""], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            deadline = time.monotonic() + timeout_s
            while proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.is_alive():
                log.warning("engine process %d did not exit in %.0fs; terminating", proc.pid, timeout_s)
                proc.terminate()
                await asyncio.to_thread(proc.join, 5.0)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5.0)
        self._mark_dead("engine shut down")
        for t in self._tasks:
            t.cancel()
        if proc is not None:
            try:
                asyncio.get_running_loop().remove_reader(proc.sentinel)
            except (ValueError, OSError):
                pass
        if self._ctx is not None:
            self._from_engine.close(0)
            self._to_engine.close(0)
            self._ctx.term()
            self._ctx = None
        if self._tmpdir:
            ipc_dir.remove(self._tmpdir)

    @property
    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def dead(self) -> str | None:
        return self._dead

    async def drain(self, grace_s: float, abort_timeout_s: float = 10.0) -> None:
        """Graceful stop (SIGTERM): refuse new requests and calls, let in-flight requests run
        for up to `grace_s`, then end the rest as pause(abort) does, with their partial output
        and finish_reason="abort". Returns once every request has had its final output."""
        self._draining = True
        await self._until_no_callers(grace_s)
        if self._num_callers() and self._dead is None and self._unavailable is None:
            log.info("shutting down: aborting %d request(s) still in flight", self._num_callers())
            try:
                await self._request(ops.Abort(), abort_timeout_s)
            except EngineError as e:
                log.warning("shutting down: could not abort the requests in flight: %s", e)
            await self._until_no_callers(abort_timeout_s)

    def _num_callers(self) -> int:
        """Requests whose caller still waits for their output."""
        return sum(not chan.abandoned for chan in self._routes.values())

    async def _until_no_callers(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._num_callers() and self._dead is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # -- receiving -----------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        sock = self._from_engine
        while True:
            kind, payload = await sock.recv_multipart()
            try:
                msg = P.decode(kind, payload)
            except Exception:
                log.exception("undecodable message from the engine (kind %r)", kind)
                continue
            if kind == P.OUTPUTS:
                routes = self._routes
                for out in msg.outputs:
                    stream = routes.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
                if self.metrics is not None:
                    self.metrics.on_step(msg.step_count, msg.step_time_s)
            elif kind == P.REPLY:
                if msg.stats is not None:
                    self._on_stats(msg.stats)
                fut = self._calls.pop(msg.call_id, None) or self._aborts.pop(msg.call_id, None)
                if fut is not None and not fut.done():
                    if msg.error is None:
                        fut.set_result(msg.result)
                    else:
                        fut.set_exception(_reply_error(msg))
            elif kind == P.HEARTBEAT:
                self._last_heartbeat = time.monotonic()
                self.heartbeat = msg
                if msg.stats is not None:
                    self._on_stats(msg.stats)
                if self._unavailable is not None:
                    self._check_stall()
            elif kind == P.READY:
                self._last_heartbeat = time.monotonic()
                if not self._ready.done():
                    self._ready.set_result(msg)
            elif kind == P.FAILED:
                if not self._ready.done():
                    self._ready.set_exception(EngineDead(f"engine core failed to start: {msg.reason}"))

    def _on_stats(self, stats: dict[str, Any]) -> None:
        self.stats = stats
        if self.metrics is not None:
            self.metrics.on_engine_stats(stats)

    def _on_process_exit(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(proc.sentinel)
        except (ValueError, OSError):
            pass
        proc.join(0.1)
        if not self._closing:
            log.error("engine core process %s exited (exit code %s)", proc.pid, proc.exitcode)
        self._mark_dead(f"engine core process exited (exit code {proc.exitcode})")

    def _mark_dead(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        self._fail_open(EngineDead, self._dead)
        aborts, self._aborts = self._aborts, {}
        for fut in aborts.values():
            if not fut.done():
                fut.set_exception(EngineDead(self._dead))
        if hasattr(self, "_ready") and not self._ready.done():
            self._ready.set_exception(EngineDead(self._dead))

    def _fail_open(self, error: type[EngineError], reason: str) -> None:
        """Fail every open stream and control call. Streams keep their route (and so their id)
        until the engine confirms their abort: see _abandon."""
        for stream in self._routes.values():
            stream.fail(error(reason))
        calls, self._calls = self._calls, {}
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(error(reason))

    async def _watch_heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            ok = self._check_stall()
            if self.metrics is not None:
                self.metrics.set_health(ok)

    def _check_stall(self) -> bool:
        """Enter or leave the unavailable state from the health rules; returns health.ok.
        Only a live engine that has stopped answering is unavailable: death is final."""
        h = self.health()
        stalled = h.stalled and self._dead is None
        if stalled and self._unavailable is None:
            self._unavailable = f"the engine is not responding ({h.reason})"
            log.error(
                "%s: failing %d request(s) and %d control call(s) in flight; new ones get 503 until it answers again",
                self._unavailable,
                len(self._routes),
                len(self._calls),
            )
            self._fail_open(EngineUnavailable, self._unavailable)
        elif not stalled and self._unavailable is not None and self._dead is None:
            log.warning("the engine answers again after: %s", self._unavailable)
            self._unavailable = None
        return h.ok

    def health(self) -> Health:
        detail: dict[str, Any] = {"engine_pid": self.engine_pid}
        if self._dead is not None:
            return Health(False, self._dead, detail)
        if self.ready is None:
            return Health(False, "engine core is starting", detail)
        hb = self.heartbeat
        age = time.monotonic() - self._last_heartbeat
        detail["heartbeat_age_s"] = round(age, 3)
        if age > self.heartbeat_timeout_s:
            return Health(
                False,
                f"no heartbeat from the engine process for {age:.1f}s (limit {self.heartbeat_timeout_s:g}s)",
                detail,
                stalled=True,
            )
        if hb is None:
            return Health(True, "ok", detail)
        detail.update(state=hb.state, probe_age_s=round(hb.probe_age_s, 3))
        if not hb.core_alive:
            return Health(False, f"engine core loop is dead: {hb.error or 'stopped'}", detail)
        if hb.probe_age_s > self.stuck_after_s:
            return Health(
                False,
                f"engine core loop is stuck: it has not read its inbox for "
                f"{hb.probe_age_s:.1f}s (limit {self.stuck_after_s:.0f}s)",
                detail,
            )
        fenced = (hb.stats or {}).get("fenced")
        if fenced:  # alive but refusing generation (503 engine_not_serving)
            detail["fenced"] = fenced
        return Health(True, "ok", detail)

    # -- sending -------------------------------------------------------------------------
    def _check_admit(self) -> None:
        """Refuse new work the engine cannot take now (raises)."""
        if self._dead is not None:
            raise EngineDead(self._dead)
        if self._draining:
            raise EngineUnavailable("the server is shutting down")
        if self._unavailable is not None:
            raise EngineUnavailable(self._unavailable)

    def _send(self, kind: bytes, msg: Any) -> None:
        if self._dead is not None:
            raise EngineDead(self._dead)
        self._to_engine.send_multipart([kind, P.encode(msg)], flags=zmq.NOBLOCK, copy=False)

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{self._req_prefix}-{next(self._req_ids)}"

    # -- generation ----------------------------------------------------------------------
    def process_prompt(self, prompt: Prompt | None, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Token ids of `prompt`, or ValueError naming what is wrong (too long, bad ids, ...)."""
        if self.input is None:
            raise EngineDead(self._dead or "engine core is not running")
        return self.input.process(prompt, params)

    async def generate(
        self,
        prompt: Prompt | None,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = True,
        delta: bool = False,
        timeout_s: float | None = None,
        prompt_token_ids: list[int] | None = None,
        prior_output_tokens: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Yields RequestOutputs as tokens arrive (cumulative, or only what is new with
        `delta=True`); the last one has `finished=True`; with `stream=False` only that one (and the
        engine sends nothing before it). Closing the iterator early aborts the
        request. Raises ValueError (bad prompt), EngineNotServing (rejected while paused),
        EngineDead, RequestTimeout. `prior_output_tokens`: how many trailing prompt tokens are
        earlier output of this same sample (EngineInvalidInput unless in [0, prompt length])."""
        params = sampling_params or SamplingParams()
        if prompt_token_ids is None:
            text, ids = self.process_prompt(prompt, params)
        else:
            text, ids = (prompt if isinstance(prompt, str) else None), prompt_token_ids
        check_prior_output_tokens(prior_output_tokens, len(ids))
        self._check_admit()
        rid = request_id or self.new_request_id()
        if rid in self._routes:
            raise ValueError(f"request_id={rid!r} is already in flight: expected a unique id")
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        state = RequestState(rid, text, ids, params, self.tokenizer, stream=stream)
        chan = _Stream()
        self._routes[rid] = chan  # the reply channel exists before the request is sent
        timer = asyncio.get_running_loop().call_later(timeout, chan.expire)
        finished = False
        try:
            # Not streamed: the engine sends the final output only (no per-token traffic to encode,
            # send and decode for a caller that waits for the end anyway).
            add = AddRequest(rid, ids, params, final_only=not stream, prior_output_tokens=prior_output_tokens)
            self._send(P.ADD, add)
            while not finished:
                try:
                    outs = await chan.take()
                except asyncio.TimeoutError:
                    raise RequestTimeout(f"request {rid} did not finish within {timeout:.0f}s") from None
                failed = None
                for out in outs:
                    state.apply(out)
                    failed = failed or (out if out.error is not None else None)
                if failed is not None:
                    finished = state.finished
                    raise _output_error(failed)
                if chan.failure is not None and not state.finished:
                    f = chan.failure
                    raise type(f)(*f.args)
                finished = state.finished
                if stream or finished:
                    yield state.delta_output() if delta else state.output()
        finally:
            timer.cancel()
            if finished or self._dead is not None:
                self._routes.pop(rid, None)
            else:
                self._abandon(rid, chan)

    def _abandon(self, rid: str, chan: _Stream) -> None:
        """The caller went away or timed out: abort the request to free its KV now, and keep
        its id taken until the engine confirms the abort. The engine answers an abort only
        after it has emitted the request's last output, so no stale output of this request can
        ever reach a later request that reuses the id."""
        chan.abandoned = True
        cid = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()

        def release(_: asyncio.Future) -> None:
            if self._routes.get(rid) is chan:
                del self._routes[rid]

        fut.add_done_callback(release)
        self._aborts[cid] = fut
        try:
            self._send(P.CONTROL, P.ControlCallMsg(cid, ops.Abort(request_ids=[rid])))
        except (zmq.ZMQError, EngineDead):
            self._aborts.pop(cid, None)
            fut.cancel()

    # -- control: ControlAPI's methods over ZeroMQ --------------------------------------
    async def _control(self, op: ops.ControlOp, wait_s: float) -> dict[str, Any]:
        self._check_admit()
        return await self._request(op, wait_s)

    async def _request(self, op: ops.ControlOp, wait_s: float) -> dict[str, Any]:
        if self._dead is not None:
            raise EngineDead(self._dead)
        op.check_wire()
        cid = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[cid] = fut  # registered before the call is sent
        t0 = time.perf_counter()
        outcome = "error"
        try:
            self._send(P.CONTROL, P.ControlCallMsg(cid, op))
            result = await asyncio.wait_for(fut, wait_s)
            outcome = "ok"
            return result
        except asyncio.TimeoutError:
            outcome = "timeout"
            raise ControlTimeout(f"{op.name}: no reply from the engine within {wait_s:.1f}s") from None
        finally:
            self._calls.pop(cid, None)
            if self.metrics is not None:
                self.metrics.on_control(op.name, outcome, time.perf_counter() - t0)


def _reply_error(reply: P.Reply) -> EngineError:
    """The exception a control call raised in the engine process, rebuilt from its reply."""
    if reply.error_type == "EngineInvalidInput":
        d = reply.result or {}
        return EngineInvalidInput(
            str(d.get("field", "request")), d.get("value"), str(d.get("expected", "")), reply.error
        )
    return _REPLY_ERRORS.get(reply.error_type or "", EngineError)(reply.error)


def _output_error(out: EngineOutput) -> EngineError:
    """The exception for a request output that carries an error, by its error_type."""
    if out.error_type == "invalid_input":
        return EngineInvalidInput(out.error_param or "request", None, "a request the engine can serve", out.error)
    if out.error_type is None and (out.error or "").startswith("rejected"):
        # An engine core that predates error_type; it sets no other kind of rejection.
        return EngineNotServing(out.error)
    return _OUTPUT_ERRORS.get(out.error_type or "", EngineDead)(out.error)


def _try_tokenizer(path: str):
    try:
        from tidal.tokenizer import load_tokenizer

        return load_tokenizer(path)
    except Exception as e:  # token-id prompts still work without one
        log.warning("no tokenizer in %s (%s); only token-id prompts will work", path, e)
        return None
