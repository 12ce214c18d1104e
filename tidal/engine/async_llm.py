"""AsyncLLM: the asyncio API over an in-process engine core thread.

Every operation is a message through the core's inbox completed by a future; no lock is held
around engine state. A request's output route is registered before the request is sent, so a
reply can never arrive before someone is listening (docs/architecture.md, "Data flow").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from tidal.config import EngineConfig
from tidal.engine import control_ops as ops
from tidal.engine.client import ControlAPI, ControlTimeout, InprocClient
from tidal.engine.io import PromptInput, RequestState, check_prior_output_tokens, raise_for_error, unwrap_prompt
from tidal.engine.messages import AddRequest, EngineOutput
from tidal.outputs import RequestOutput
from tidal.sampling_params import SamplingParams


class AsyncLLM(ControlAPI[Awaitable[dict[str, Any]]]):
    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.config = EngineConfig(model=model, **engine_kwargs)
        self.engine = InprocClient(self.config)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len

    async def generate(
        self,
        prompt: PromptInput,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        stream: bool = True,
        delta: bool = False,
        prior_output_tokens: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yields RequestOutputs as tokens arrive (cumulative, or only the new part with
        `delta=True`); the last one has `finished=True`; with `stream=False` only that one (and the
        engine sends nothing before it). Cancelling the iteration aborts the
        request. A rejected request raises EngineNotServing, one that can never be scheduled
        EngineInvalidInput, a dead engine EngineDead. `prior_output_tokens`: how many trailing
        prompt tokens are earlier output of this same sample (LLM.generate)."""
        params = sampling_params or SamplingParams()
        text, ids = self.engine.input.process(unwrap_prompt(prompt), params)
        check_prior_output_tokens(prior_output_tokens, len(ids))
        rid = request_id or self.engine.new_request_id()
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[EngineOutput] = asyncio.Queue()
        state = RequestState(rid, text, ids, params, self.tokenizer, stream=True)
        self.engine.register(rid, lambda out: loop.call_soon_threadsafe(q.put_nowait, out))
        finished = False
        try:
            add = AddRequest(rid, ids, params, final_only=not stream, prior_output_tokens=prior_output_tokens)
            self.engine.core.submit(add)
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
                self.engine.submit(ops.Abort(request_ids=[rid]))  # client went away: free its KV now
            self.engine.unregister(rid)

    # -- control (DESIGN.md §5): ControlAPI's methods, awaited ----------------------------
    async def _control(self, op: ops.ControlOp, wait_s: float) -> dict[str, Any]:
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(self.engine.submit(op)), wait_s)
        except asyncio.TimeoutError:
            raise ControlTimeout(f"{op.name}: no reply within {wait_s:.1f}s") from None
        return ops.result_dict(result)

    def shutdown(self) -> None:
        self.engine.shutdown()
