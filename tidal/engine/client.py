"""The client side of the engine, written once.

`ControlAPI` defines every control operation (engine/control_ops.py) as one method over a
transport (`_control`), with one deadline rule (`control_ops.reply_wait_s`). `LLM` (sync,
in-process), `AsyncLLM` (async, in-process) and the server's `EngineClient` (async, ZeroMQ)
are its three transports. `InprocClient` is what LLM and AsyncLLM share: the in-process core,
routing its outputs to the caller that owns each request.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from tidal.config import EngineConfig
from tidal.engine import control_ops as ops
from tidal.engine.control_ops import DEFAULT_CONTROL_TIMEOUT_S, PauseMode, reply_wait_s
from tidal.engine.core import EngineCore
from tidal.engine.io import InputProcessor
from tidal.engine.messages import ControlCall, EngineDead, EngineError, EngineOutput

log = logging.getLogger("tidal.engine")

R = TypeVar("R")


class ControlTimeout(EngineError, TimeoutError):
    """A control call got no reply before its deadline (the op may still complete later;
    every op is safe to repeat)."""


class ControlAPI(Generic[R]):
    """Every control operation, for any transport. `R` is what a call returns: the result's
    JSON form (a dict) for a sync client, an awaitable of it for an async one."""

    control_timeout_s: float = DEFAULT_CONTROL_TIMEOUT_S

    def _control(self, op: ops.ControlOp, wait_s: float) -> R:
        """Send `op` and return its reply (as R), or raise ControlTimeout after `wait_s`."""
        raise NotImplementedError

    def call(self, op: ops.ControlOp, timeout_s: float | None = None) -> R:
        """Any control op; `timeout_s` bounds the wait for ops without an engine deadline."""
        return self._control(op, reply_wait_s(op, timeout_s, self.control_timeout_s))

    def pause(self, mode: PauseMode | str = "abort", timeout_s: float | None = None) -> R:
        return self.call(ops.Pause(mode=ops.pause_mode(mode), timeout_s=timeout_s))

    def resume(self, timeout_s: float | None = None) -> R:
        return self.call(ops.Resume(), timeout_s)

    def abort(self, request_ids: Iterable[str] | None = None, timeout_s: float | None = None) -> R:
        return self.call(ops.Abort(request_ids=None if request_ids is None else list(request_ids)), timeout_s)

    def sleep(self, tags: Sequence[str] | None = None, discard: bool = False, timeout_s: float | None = None) -> R:
        return self.call(ops.Sleep(tags=None if tags is None else list(tags), discard=discard), timeout_s)

    def wake_up(self, tags: Sequence[str] | None = None, timeout_s: float | None = None) -> R:
        return self.call(ops.WakeUp(tags=None if tags is None else list(tags)), timeout_s)

    def update_weights(
        self,
        path: str | None = None,
        named_tensors: Any = None,
        version: int | None = None,
        checksums: dict[str, str] | None = None,
        timeout_s: float | None = None,
        source: ops.Source | None = None,
        *,
        group_name: str | None = None,
        tensors: list[dict[str, Any]] | None = None,
        layout: ops.Layout = "per_tensor",
        buckets: list[dict[str, Any]] | None = None,
        shm_path: str | None = None,
        ipc_handles: list[dict[str, Any]] | None = None,
        commit: bool = True,
        staging: ops.Staging = "copy",
        flush_cache: bool = True,
    ) -> R:
        """From a checkpoint directory, in-process named tensors (not over ZeroMQ), or (source=
        "distributed" | "shm" | "ipc") a trainer. `timeout_s` is the engine's deadline."""
        return self.call(
            ops.UpdateWeights(
                source=source,
                path=path,
                named_tensors=named_tensors,
                version=version,
                checksums=checksums,
                group_name=group_name,
                tensors=tensors,
                layout=layout,
                buckets=buckets,
                shm_path=shm_path,
                ipc_handles=ipc_handles,
                commit=commit,
                staging=staging,
                timeout_s=timeout_s,
                flush_cache=flush_cache,
            )
        )

    def init_weight_transfer(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: ops.Backend = "gloo",
        timeout_s: float | None = None,
    ) -> R:
        """Join the trainer's process group at rank `rank_offset` (the join runs off the core thread)."""
        return self.call(
            ops.InitWeightTransfer(
                master_address=master_address,
                master_port=master_port,
                rank_offset=rank_offset,
                world_size=world_size,
                group_name=group_name,
                backend=backend,
                timeout_s=timeout_s,
            )
        )

    def destroy_weight_transfer(self, group_name: str | None = None, timeout_s: float | None = None) -> R:
        return self.call(ops.DestroyWeightTransfer(group_name=group_name), timeout_s)

    def check_weights(self, tensors: list[dict[str, Any]], timeout_s: float | None = None) -> R:
        return self.call(ops.CheckWeights(tensors=tensors), timeout_s)

    def commit_weights(self, version: int | None = None, timeout_s: float | None = None) -> R:
        return self.call(ops.CommitWeights(version=version), timeout_s)

    def abort_staged(self, timeout_s: float | None = None) -> R:
        return self.call(ops.AbortStaged(), timeout_s)

    def fence(self, reason: str = "unspecified", timeout_s: float | None = None) -> R:
        return self.call(ops.Fence(reason=reason), timeout_s)

    def flush_cache(self, timeout_s: float | None = None) -> R:
        return self.call(ops.FlushCache(), timeout_s)

    def state(self, timeout_s: float | None = None) -> R:
        return self.call(ops.State(), timeout_s)


class InprocClient:
    """Owns an EngineCore thread and an output router (request id -> sink)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._routes: dict[str, Callable[[EngineOutput], object]] = {}
        self._routes_lock = threading.Lock()  # guards the route table only, never engine state
        self._ids = itertools.count()
        self.core = EngineCore(config, self._dispatch)
        self.model_path = self.core.model_path
        self.max_model_len = self.core.max_model_len
        self.tokenizer = _try_tokenizer(self.model_path)
        self.input = InputProcessor(self.tokenizer, self.max_model_len, self.core.runner.arch.vocab_size)
        self.core.start()

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    # -- output routing (called on the core thread) --------------------------------------
    def register(self, request_id: str, sink: Callable[[EngineOutput], object]) -> None:
        with self._routes_lock:
            if request_id in self._routes:
                raise ValueError(f"request_id={request_id!r} is already in flight: expected a unique id")
            self._routes[request_id] = sink

    def unregister(self, request_id: str) -> None:
        with self._routes_lock:
            self._routes.pop(request_id, None)

    def _dispatch(self, outputs: list[EngineOutput]) -> None:
        with self._routes_lock:
            sinks = [(self._routes.get(o.request_id), o) for o in outputs]
        for sink, out in sinks:
            if sink is not None:
                sink(out)

    # -- control -------------------------------------------------------------------------
    def submit(self, op: ops.ControlOp) -> Future:
        """Put `op` in the core's inbox; the Future gets its typed result (or its exception)."""
        fut: Future = Future()
        self.core.submit(ControlCall(op, fut))
        return fut

    def shutdown(self) -> None:
        self.core.shutdown()


def wait_result(fut: Future, op: ops.ControlOp, wait_s: float) -> dict[str, Any]:
    """The reply's JSON form, or ControlTimeout after `wait_s`."""
    try:
        return ops.result_dict(fut.result(timeout=wait_s))
    except TimeoutError:
        raise ControlTimeout(f"{op.name}: no reply within {wait_s:.1f}s") from None


def _try_tokenizer(path: str):
    try:
        from tidal.tokenizer import load_tokenizer

        return load_tokenizer(path)
    except Exception as e:  # token-id prompts still work without one
        log.warning("no tokenizer in %s (%s); only token-id prompts will work", path, e)
        return None


__all__ = [
    "ControlAPI",
    "InprocClient",
    "ControlTimeout",
    "wait_result",
    "EngineDead",
    "EngineError",
    "DEFAULT_CONTROL_TIMEOUT_S",
]
