"""What LLM and AsyncLLM share: building the in-process core, routing its outputs to the
caller that owns each request, and the control operations as inbox messages with deadlines."""
from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from tidal.config import EngineConfig
from tidal.engine.core import EngineCore
from tidal.engine.io import InputProcessor
from tidal.engine.messages import AbortRequests, ControlCall, EngineDead, EngineError, EngineOutput

log = logging.getLogger("tidal.engine")

DEFAULT_CONTROL_TIMEOUT_S = 60.0


class ControlTimeout(EngineError, TimeoutError):
    """A control call got no reply before its deadline (the op may still complete later;
    every op is safe to repeat)."""


class InprocEngine:
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
    def call(self, op: str, **kwargs: Any) -> Future:
        fut: Future = Future()
        self.core.submit(ControlCall(op, kwargs, fut))
        return fut

    def abort_future(self, request_ids: list[str] | None) -> Future:
        fut: Future = Future()
        self.core.submit(AbortRequests(request_ids, fut))
        return fut

    def shutdown(self) -> None:
        self.core.shutdown()


def wait_result(fut: Future, op: str, timeout_s: float | None) -> dict:
    timeout = DEFAULT_CONTROL_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        return fut.result(timeout=timeout)
    except TimeoutError:
        raise ControlTimeout(f"{op}: no reply within {timeout:.1f}s") from None


def _try_tokenizer(path: str):
    try:
        from tidal.tokenizer import load_tokenizer
        return load_tokenizer(path)
    except Exception as e:  # token-id prompts still work without one
        log.warning("no tokenizer in %s (%s); only token-id prompts will work", path, e)
        return None


__all__ = ["InprocEngine", "ControlTimeout", "wait_result", "EngineDead", "EngineError"]
