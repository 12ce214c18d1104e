"""LLM: the offline API (vLLM-compatible where vLLM has the same thing)."""
from __future__ import annotations

import queue
from collections.abc import Iterable, Sequence
from typing import Any

from tqdm import tqdm

from tidal.config import EngineConfig
from tidal.engine.client import InprocEngine, wait_result
from tidal.engine.io import Prompt, RequestState, raise_for_error
from tidal.engine.messages import AddRequest, EngineDead, EngineState
from tidal.outputs import RequestOutput
from tidal.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **engine_kwargs)
        self.engine = InprocEngine(self.config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, request_ids: Sequence[str] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"sampling_params has {len(params_list)} entries: expected one per prompt "
                             f"({len(prompts)}) or a single SamplingParams")
        ids = list(request_ids) if request_ids is not None else [self.engine.new_request_id() for _ in prompts]
        # Validate everything before anything is sent: a bad prompt changes no state.
        processed = [self.engine.input.process(p, sp) for p, sp in zip(prompts, params_list)]
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        states = {rid: RequestState(rid, text, toks, sp, self.tokenizer)
                  for rid, (text, toks), sp in zip(ids, processed, params_list)}
        for rid in ids:
            self.engine.register(rid, inbox.put)
        try:
            for rid, (_, toks), sp in zip(ids, processed, params_list):
                # Offline: one output per sample when it finishes, no per-token traffic.
                self.engine.core.submit(AddRequest(rid, toks, sp, final_only=True))
            self._collect(states, inbox, use_tqdm and len(ids) > 1)
        finally:
            for rid in ids:
                self.engine.unregister(rid)
        return [states[rid].output() for rid in ids]

    def _collect(self, states: dict[str, RequestState], inbox: queue.SimpleQueue, progress: bool) -> None:
        pending = len(states)
        bar = tqdm(total=pending, desc="generate", unit="req", disable=not progress)
        try:
            while pending:
                try:
                    out = inbox.get(timeout=1.0)
                except queue.Empty:
                    if self.engine.core.state is EngineState.DEAD:
                        raise EngineDead(f"engine core died: {self.engine.core.error}") from None
                    continue
                st = states[out.request_id]
                was = st.finished
                st.apply(out)
                if out.error_type == "invalid_input":  # the whole call fails: stop the rest now
                    self.engine.abort_future(list(states))
                    raise_for_error(st)
                if st.finished and not was:
                    pending -= 1
                    bar.update(1)
        finally:
            bar.close()

    # -- control (DESIGN.md §5); each call has a deadline ---------------------------------
    def _control(self, op: str, wait_s: float | None, **kwargs: Any) -> dict:
        return wait_result(self.engine.call(op, **kwargs), op, wait_s)

    def pause(self, mode: str = "abort", timeout_s: float | None = None) -> dict:
        wait = None if timeout_s is None else timeout_s + 10.0
        return self._control("pause", wait, mode=mode, timeout_s=timeout_s)

    def resume(self, timeout_s: float | None = None) -> dict:
        return self._control("resume", timeout_s)

    def abort(self, request_ids: Iterable[str] | None = None, timeout_s: float | None = None) -> dict:
        ids = None if request_ids is None else list(request_ids)
        return wait_result(self.engine.abort_future(ids), "abort", timeout_s)

    def sleep(self, tags: Sequence[str] | None = None, discard: bool = False, timeout_s: float | None = None) -> dict:
        return self._control("sleep", timeout_s, tags=None if tags is None else list(tags), discard=discard)

    def wake_up(self, tags: Sequence[str] | None = None, timeout_s: float | None = None) -> dict:
        return self._control("wake_up", timeout_s, tags=None if tags is None else list(tags))

    def update_weights(self, path: str | None = None, named_tensors=None, version: int | None = None,
                       checksums: dict[str, str] | None = None, timeout_s: float | None = None,
                       source: str | None = None, **transfer: Any) -> dict:
        """From a checkpoint directory, in-process named tensors, or (source="distributed" |
        "shm" | "ipc") a trainer: `transfer` holds group_name, tensors, layout, buckets, shm_path,
        ipc_handles, commit, staging (tidal/engine/weights.py). `timeout_s` is the engine's deadline."""
        wait = None if timeout_s is None else timeout_s + 10.0
        return self._control("update_weights", wait, path=path, named_tensors=named_tensors, version=version,
                             checksums=checksums, source=source, timeout_s=timeout_s, **transfer)

    def init_weight_transfer(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                             group_name: str, backend: str = "gloo", timeout_s: float | None = None) -> dict:
        """Join the trainer's process group at rank `rank_offset` (the join runs off the core thread)."""
        wait = None if timeout_s is None else timeout_s + 10.0
        return self._control("init_weight_transfer", wait, master_address=master_address, master_port=master_port,
                             rank_offset=rank_offset, world_size=world_size, group_name=group_name,
                             backend=backend, timeout_s=timeout_s)

    def destroy_weight_transfer(self, group_name: str | None = None, timeout_s: float | None = None) -> dict:
        return self._control("destroy_weight_transfer", timeout_s, group_name=group_name)

    def check_weights(self, tensors: list[dict], timeout_s: float | None = None) -> dict:
        return self._control("check_weights", timeout_s, tensors=tensors)

    def commit_weights(self, version: int | None = None, timeout_s: float | None = None) -> dict:
        return self._control("commit_weights", timeout_s, version=version)

    def abort_staged(self, timeout_s: float | None = None) -> dict:
        return self._control("abort_staged", timeout_s)

    def flush_cache(self, timeout_s: float | None = None) -> dict:
        return self._control("flush_cache", timeout_s)

    def state(self, timeout_s: float | None = None) -> dict:
        return self._control("state", timeout_s)

    def shutdown(self) -> None:
        self.engine.shutdown()
