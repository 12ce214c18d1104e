"""OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models (DESIGN.md §6)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from tidal.outputs import CompletionOutput
from tidal.server import schemas as S
from tidal.server.errors import APIError, error_responses
from tidal.server.service import (
    INFERENCE_ERRORS,
    INLINE_CHARS,
    JSON_OR_SSE,
    Fields,
    ServerCore,
    Track,
    event,
    json_response,
    merge,
    sampling_params,
    usage_of,
    work_of,
)


class OpenAIRoutes:
    """The OpenAI surface: completions and chat, streaming or not."""

    def __init__(self, core: ServerCore) -> None:
        self.core = core

    def register(self, app: FastAPI, user: list) -> None:
        inference = dict(dependencies=user, responses={**JSON_OR_SSE, **INFERENCE_ERRORS})
        app.post("/v1/completions", **inference)(self.completions)
        app.post("/v1/chat/completions", **inference)(self.chat_completions)
        app.get("/v1/models", dependencies=user, responses=error_responses(401, 405))(self.models)

    def _check_extras(self, body: S._SamplingFields) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name}={getattr(body, name)} is not supported: expected 0", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported: expected null or {}", param="logit_bias")

    # -- /v1/completions -----------------------------------------------------------------
    async def completions(self, body: S.CompletionRequest, request: Request) -> Response:
        self.core.check_model(body.model)
        if body.echo:
            raise APIError(400, "echo=true is not supported: expected false", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported: expected null", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, f"best_of={body.best_of} is not supported: expected null or n={body.n}",
                           param="best_of")
        self._check_extras(body)
        params = sampling_params(body, body.max_tokens or 16, body.logprobs)
        p = body.prompt
        prompts: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        fields = Fields("prompt")
        prepared = await self.core.prepare(prompts, params, fields)
        rid = self.core.request_id(body.request_id, "cmpl")
        gens = self.core.start_requests(prepared, params, rid, body.stream)
        track = Track(self.core.metrics, len(prepared) * params.n)
        if body.stream:
            return await self.core.sse(request, self._completion_events(body, rid, prepared, gens, track),
                                   track, rid, fields)
        outs = await self.core.run_collect(request, gens, rid, fields, track.left)

        def build() -> dict:
            choices = []
            for i, o in enumerate(outs):
                for c in o.outputs:
                    choice = {"index": i * body.n + c.index, "text": c.text,
                              "logprobs": self._completion_logprobs(c, 0) if body.logprobs is not None else None,
                              "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                    if body.return_token_ids:
                        choice.update(token_ids=c.token_ids, prompt_token_ids=o.prompt_token_ids,
                                      weight_version=c.weight_version,
                                      weight_spans=[[s.version, s.start, s.end] for s in c.weight_spans])
                    choices.append(choice)
            return {"id": rid, "object": "text_completion", "created": int(time.time()),
                    "model": self.core.model_name, "choices": choices, "usage": usage_of(outs)}
        return await self.core.respond(build, work_of(outs, body.logprobs))

    def _completion_logprobs(self, c: CompletionOutput, offset0: int) -> dict:
        tt = self.core.token_text
        toks = [tt(t) for t in c.token_ids]
        offsets, off = [], offset0
        for s in toks:
            offsets.append(off)
            off += len(s)
        top = None
        if c.top_logprobs is not None:
            top = [{tt(t): lp for t, lp in d.items()} for d in c.top_logprobs]
        return {"tokens": toks, "token_logprobs": list(c.token_logprobs or []), "top_logprobs": top,
                "text_offset": offsets}

    async def _completion_events(self, body: S.CompletionRequest, rid: str, prepared, gens,
                                 track: Track) -> AsyncIterator[bytes]:
        created, n = int(time.time()), body.n
        offsets: dict[int, int] = {}
        totals: dict[tuple[int, int], int] = {}
        async for i, out in merge(gens, track):
            track.tokens(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                if not c.token_ids and not c.text and c.finish_reason is None:
                    continue
                idx = i * n + c.index
                totals[(i, c.index)] = totals.get((i, c.index), 0) + len(c.token_ids)
                choice: dict[str, Any] = {"index": idx, "text": c.text, "logprobs": None,
                                          "finish_reason": c.finish_reason}
                if body.logprobs is not None:
                    choice["logprobs"] = self._completion_logprobs(c, offsets.get(idx, 0))
                    offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in choice["logprobs"]["tokens"])
                if c.finish_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                    track.finish(c.finish_reason)
                if body.return_token_ids:
                    choice["token_ids"] = c.token_ids
                    choice["weight_version"] = c.weight_version
                    if c.finish_reason is not None:
                        choice["weight_spans"] = [[s.version, s.start, s.end] for s in c.weight_spans]
                yield event({"id": rid, "object": "text_completion", "created": created,
                             "model": self.core.model_name, "choices": [choice]})
        prompt_tokens = sum(len(t) for _, t in prepared)
        self.core.metrics.prompt_tokens.labels(self.core.model_name).inc(prompt_tokens)
        if body.stream_options is not None and body.stream_options.include_usage:
            comp = sum(totals.values())
            yield event({"id": rid, "object": "text_completion", "created": created, "model": self.core.model_name,
                         "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": comp,
                                                  "total_tokens": prompt_tokens + comp}})
        yield b"data: [DONE]\n\n"

    # -- /v1/chat/completions ------------------------------------------------------------
    async def chat_completions(self, body: S.ChatCompletionRequest, request: Request) -> Response:
        self.core.check_model(body.model)
        self._check_extras(body)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        ids = await self._chat_prompt(body)
        limit = self.core.engine.max_model_len
        if len(ids) >= limit:
            raise APIError(400, f"messages are {len(ids)} tokens after the chat template: expected fewer "
                                f"than max_model_len={limit}", param="messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or (limit - len(ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens, logprobs)
        fields = Fields("messages")
        prepared = await self.core.prepare([ids], params, fields)
        rid = self.core.request_id(body.request_id, "chatcmpl")
        gens = self.core.start_requests(prepared, params, rid, body.stream)
        track = Track(self.core.metrics, params.n)
        if body.stream:
            return await self.core.sse(request, self._chat_events(body, rid, prepared, gens, track), track, rid, fields)
        outs = await self.core.run_collect(request, gens, rid, fields, track.left)

        def build() -> dict:
            o = outs[0]
            choices = []
            for c in o.outputs:
                choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                          "logprobs": self._chat_logprobs(c) if body.logprobs else None,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if body.return_token_ids:
                    choice.update(token_ids=c.token_ids, weight_version=c.weight_version,
                                  weight_spans=[[s.version, s.start, s.end] for s in c.weight_spans])
                choices.append(choice)
            resp = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.core.model_name,
                    "choices": choices, "usage": usage_of(outs)}
            if body.return_token_ids:
                resp["prompt_token_ids"] = o.prompt_token_ids
            return resp
        return await self.core.respond(build, work_of(outs, logprobs))

    async def _chat_prompt(self, body: S.ChatCompletionRequest) -> list[int]:
        tok = self.core.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(p.text for p in content)
            msg = {"role": m.role, "content": content or ""}
            if m.name:
                msg["name"] = m.name
            messages.append(msg)
        chars = sum(len(m["content"]) for m in messages)
        if self.core.max_prompt_chars and chars > self.core.max_prompt_chars:
            raise APIError(400, f"messages are {chars} characters: expected at most {self.core.max_prompt_chars} "
                                f"(they cannot fit in max_model_len={self.core.engine.max_model_len} tokens)",
                           param="messages")

        def render() -> list[int]:
            try:
                text = tok.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=body.add_generation_prompt)
                return list(tok.encode(text, add_special_tokens=False))
            except Exception as e:  # a template may reject roles or orderings
                raise APIError(400, f"messages could not be rendered with the chat template: {e}",
                               param="messages") from None
        return await asyncio.to_thread(render) if chars > INLINE_CHARS else render()

    def _chat_logprobs(self, c: CompletionOutput) -> dict:
        tt = self.core.token_text
        content = []
        for k, (t, lp) in enumerate(zip(c.token_ids, c.token_logprobs or [])):
            s = tt(t)
            top = []
            if c.top_logprobs is not None and k < len(c.top_logprobs):
                top = [{"token": tt(a), "logprob": b, "bytes": list(tt(a).encode())}
                       for a, b in c.top_logprobs[k].items()]
            content.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": top})
        return {"content": content}

    async def _chat_events(self, body: S.ChatCompletionRequest, rid: str, prepared, gens,
                           track: Track) -> AsyncIterator[bytes]:
        created = int(time.time())
        started: set[int] = set()
        total = 0
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.core.model_name}
        async for _, out in merge(gens, track):
            track.tokens(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                if c.index not in started:
                    started.add(c.index)
                    yield event({**base, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]})
                if not c.token_ids and not c.text and c.finish_reason is None:
                    continue
                total += len(c.token_ids)
                delta = {"content": c.text} if (c.text or c.finish_reason is None) else {}
                choice: dict[str, Any] = {"index": c.index, "delta": delta,
                                          "logprobs": self._chat_logprobs(c) if body.logprobs else None,
                                          "finish_reason": c.finish_reason}
                if c.finish_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                    track.finish(c.finish_reason)
                if body.return_token_ids:
                    choice["token_ids"] = c.token_ids
                    choice["weight_version"] = c.weight_version
                    if c.finish_reason is not None:
                        choice["weight_spans"] = [[s.version, s.start, s.end] for s in c.weight_spans]
                yield event({**base, "choices": [choice]})
        prompt_tokens = len(prepared[0][1])
        self.core.metrics.prompt_tokens.labels(self.core.model_name).inc(prompt_tokens)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield event({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": total,
                                                          "total_tokens": prompt_tokens + total}})
        yield b"data: [DONE]\n\n"

    async def models(self) -> Response:
        c = self.core.client
        return json_response({"object": "list", "data": [{
            "id": self.core.model_name, "object": "model", "created": self.core.created, "owned_by": "tidal",
            "root": c.model_path if c else None, "max_model_len": c.max_model_len if c else None}]})

