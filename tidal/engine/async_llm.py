"""AsyncLLM: the asyncio API over an in-process engine core thread.

Every operation is a message through the core's inbox completed by a future; no lock is held
around engine state. A request's output route is registered before the request is sent, so a
reply can never arrive before someone is listening (docs/architecture.md, "Data flow").
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from tidal.config import EngineConfig
from tidal.engine.client import DEFAULT_CONTROL_TIMEOUT_S, ControlTimeout, InprocEngine
from tidal.engine.io import PromptInput, RequestState, raise_for_error, unwrap_prompt
from tidal.engine.messages import AddRequest, EngineOutput
from tidal.outputs import RequestOutput
from tidal.sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **engine_kwargs)
        self.engine = InprocEngine(self.config)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len

    async def generate(self, prompt: PromptInput, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, stream: bool = True,
                       delta: bool = False) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs as tokens arrive (cumulative, or only the new part with
        `delta=True`); the last one has `finished=True`. Cancelling the iteration aborts the
        request. A rejected request raises EngineNotServing, one that can never be scheduled
        EngineInvalidInput, a dead engine EngineDead."""
        params = sampling_params or SamplingParams()
        text, ids = self.engine.input.process(unwrap_prompt(prompt), params)
        rid = request_id or self.engine.new_request_id()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[EngineOutput] = asyncio.Queue()
        state = RequestState(rid, text, ids, params, self.tokenizer, stream=True)
        self.engine.register(rid, lambda out: loop.call_soon_threadsafe(q.put_nowait, out))
        finished = False
        try:
            self.engine.core.submit(AddRequest(rid, ids, params))
            while not finished:
                out = await q.get()
                state.apply(out)
                while not q.empty():  # coalesce what is already here
                    state.apply(q.get_nowait())
                if state.error is not None:
                    finished = state.finished
                    raise_for_error(state)
                finished = state.finished
                if stream or finished:
                    yield state.delta_output() if delta else state.output()
        finally:
            if not finished:
                self.engine.abort_future([rid])  # client went away: free its KV now
            self.engine.unregister(rid)

    async def _control(self, op: str, wait_s: float | None, **kwargs: Any) -> dict:
        return await _await(self.engine.call(op, **kwargs), op, wait_s)

    async def abort(self, request_ids: Iterable[str] | None = None, timeout_s: float | None = None) -> dict:
        ids = None if request_ids is None else list(request_ids)
        return await _await(self.engine.abort_future(ids), "abort", timeout_s)

    async def pause(self, mode: str = "abort", timeout_s: float | None = None) -> dict:
        wait = None if timeout_s is None else timeout_s + 10.0
        return await self._control("pause", wait, mode=mode, timeout_s=timeout_s)

    async def resume(self, timeout_s: float | None = None) -> dict:
        return await self._control("resume", timeout_s)

    async def sleep(self, tags: Sequence[str] | None = None, discard: bool = False,
                    timeout_s: float | None = None) -> dict:
        return await self._control("sleep", timeout_s, tags=None if tags is None else list(tags), discard=discard)

    async def wake_up(self, tags: Sequence[str] | None = None, timeout_s: float | None = None) -> dict:
        return await self._control("wake_up", timeout_s, tags=None if tags is None else list(tags))

    async def update_weights(self, path: str | None = None, named_tensors=None, version: int | None = None,
                       checksums: dict[str, str] | None = None, timeout_s: float | None = None,
                       source: str | None = None, **transfer: Any) -> dict:
        """From a checkpoint directory, in-process named tensors, or (source="distributed" |
        "shm" | "ipc") a trainer: `transfer` holds group_name, tensors, layout, buckets, shm_path,
        ipc_handles, commit, staging (tidal/engine/weights.py). `timeout_s` is the engine's deadline."""
        wait = None if timeout_s is None else timeout_s + 10.0
        return await self._control("update_weights", wait, path=path, named_tensors=named_tensors, version=version,
                             checksums=checksums, source=source, timeout_s=timeout_s, **transfer)

    async def init_weight_transfer(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                             group_name: str, backend: str = "gloo", timeout_s: float | None = None) -> dict:
        """Join the trainer's process group at rank `rank_offset` (the join runs off the core thread)."""
        wait = None if timeout_s is None else timeout_s + 10.0
        return await self._control("init_weight_transfer", wait, master_address=master_address, master_port=master_port,
                             rank_offset=rank_offset, world_size=world_size, group_name=group_name,
                             backend=backend, timeout_s=timeout_s)

    async def destroy_weight_transfer(self, group_name: str | None = None, timeout_s: float | None = None) -> dict:
        return await self._control("destroy_weight_transfer", timeout_s, group_name=group_name)

    async def check_weights(self, tensors: list[dict], timeout_s: float | None = None) -> dict:
        return await self._control("check_weights", timeout_s, tensors=tensors)

    async def commit_weights(self, version: int | None = None, timeout_s: float | None = None) -> dict:
        return await self._control("commit_weights", timeout_s, version=version)

    async def abort_staged(self, timeout_s: float | None = None) -> dict:
        return await self._control("abort_staged", timeout_s)

    async def flush_cache(self, timeout_s: float | None = None) -> dict:
        return await self._control("flush_cache", timeout_s)

    async def state(self, timeout_s: float | None = None) -> dict:
        return await self._control("state", timeout_s)

    def shutdown(self) -> None:
        self.engine.shutdown()


async def _await(fut, op: str, timeout_s: float | None) -> dict:
    timeout = DEFAULT_CONTROL_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
    except asyncio.TimeoutError:
        raise ControlTimeout(f"{op}: no reply within {timeout:.1f}s") from None

