"""RL-native /generate: token ids in and out, logprobs, weight versions (DESIGN.md §6)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from tidal.outputs import CompletionOutput
from tidal.server import schemas as S
from tidal.server.errors import APIError
from tidal.server.service import (
    INFERENCE_ERRORS,
    JSON_OR_SSE,
    Fields,
    ServerCore,
    Track,
    event,
    merge,
    sampling_params,
    work_of,
)


class GenerateRoutes:
    """POST /generate."""

    def __init__(self, core: ServerCore) -> None:
        self.core = core

    def register(self, app: FastAPI, user: list) -> None:
        app.post("/generate", dependencies=user, responses={**JSON_OR_SSE, **INFERENCE_ERRORS})(self.generate)

    # -- /generate -----------------------------------------------------------------------
    async def generate(self, body: S.GenerateRequest, request: Request) -> Response:
        if (body.input_ids is None) == (body.text is None):
            raise APIError(400, "give exactly one of input_ids or text", param="input_ids")
        sp = body.sampling_params
        logprobs = sp.logprobs if sp.logprobs is not None else (0 if body.return_logprob else None)
        params = sampling_params(sp, sp.max_tokens, logprobs, prefix="sampling_params.")
        fields = Fields("input_ids" if body.input_ids is not None else "text", "sampling_params.")
        prompt = body.input_ids if body.input_ids is not None else body.text
        prepared = await self.core.prepare([prompt], params, fields)
        rid = self.core.request_id(body.request_id, "gen")
        gens = self.core.start_requests(prepared, params, rid, body.stream, body.timeout_s)
        track = Track(self.core.metrics, params.n)
        if body.stream:
            return await self.core.sse(request, self._generate_events(rid, prepared, gens, track), track, rid,
                                   fields, body.timeout_s)
        o = (await self.core.run_collect(request, gens, rid, fields, track.left, body.timeout_s))[0]

        def build() -> Any:
            samples = [self._generate_sample(rid, c, len(o.prompt_token_ids), final=True) for c in o.outputs]
            return samples[0] if len(samples) == 1 else samples
        return await self.core.respond(build, work_of([o], logprobs))

    @staticmethod
    def _generate_sample(rid: str, c: CompletionOutput, prompt_tokens: int, final: bool,
                         completion_tokens: int | None = None) -> dict:
        d = {"request_id": rid, "index": c.index, "output_ids": c.token_ids, "text": c.text,
             "output_logprobs": c.token_logprobs, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
             "weight_version": c.weight_version, "prompt_tokens": prompt_tokens,
             "completion_tokens": len(c.token_ids) if completion_tokens is None else completion_tokens}
        if c.top_logprobs is not None:
            d["output_top_logprobs"] = [{str(k): v for k, v in t.items()} for t in c.top_logprobs]
        if final or c.finish_reason is not None:
            d["weight_spans"] = [[s.version, s.start, s.end] for s in c.weight_spans]
        return d

    async def _generate_events(self, rid: str, prepared, gens, track: Track) -> AsyncIterator[bytes]:
        counts: dict[int, int] = {}
        prompt_tokens = len(prepared[0][1])
        async for _, out in merge(gens, track):
            track.tokens(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                if not c.token_ids and not c.text and c.finish_reason is None:
                    continue
                counts[c.index] = counts.get(c.index, 0) + len(c.token_ids)
                if c.finish_reason is not None:
                    track.finish(c.finish_reason)
                yield event(self._generate_sample(rid, c, prompt_tokens, final=False,
                                                  completion_tokens=counts[c.index]))
        self.core.metrics.prompt_tokens.labels(self.core.model_name).inc(prompt_tokens)
        yield b"data: [DONE]\n\n"

