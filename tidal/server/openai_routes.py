"""OpenAI-compatible /v1/completions, /v1/chat/completions and /v1/models (DESIGN.md §6), with
vLLM's extensions: token-id prompts, echo with logprobs, prompt_logprobs, penalties,
include_stop_str_in_output, return_token_ids, return_tokens_as_token_ids.

No field is silently ignored: each one is implemented, accepted-and-ignored for a reason named
in _IGNORED (and docs/compatibility.md), or refused with a 400 naming it.

One job past 400 lines: the OpenAI surface's three endpoints with their request checks and streaming
and non-streaming replies."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from tidal.outputs import CompletionOutput, RequestOutput
from tidal.server import schemas as S
from tidal.server.errors import APIError, error_responses
from tidal.server.service import (
    INFERENCE_ERRORS,
    INLINE_CHARS,
    JSON_OR_SSE,
    Fields,
    ServerCore,
    TokenText,
    Track,
    event,
    json_response,
    merge,
    sampling_params,
    usage_of,
    work_of,
)

# Extra body fields accepted and ignored, each for the reason given (docs/compatibility.md).
_IGNORED = {
    "metadata": "labels for the caller's own records; nothing here stores requests",
    "store": "nothing here stores requests",
    "service_tier": "one tier: every request is served alike",
    "parallel_tool_calls": "only meaningful with tools, which are refused",
}
# Extra fields other servers know, refused with the reason (any other unknown field: 400 too).
_REFUSED = {
    "functions": "function calling is not supported (no tool-call parser)",
    "function_call": "function calling is not supported (no tool-call parser)",
    "guided_json": "structured output is not supported",
    "guided_regex": "structured output is not supported",
    "guided_choice": "structured output is not supported",
    "guided_grammar": "structured output is not supported",
    "structured_outputs": "structured output is not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "beam search is not supported",
    "echo": "echo is a /v1/completions field here",
}


class OpenAIRoutes:
    """The OpenAI surface: completions and chat, streaming or not."""

    def __init__(self, core: ServerCore) -> None:
        self.core = core

    def register(self, app: FastAPI, user: list) -> None:
        inference: dict[str, Any] = dict(dependencies=user, responses={**JSON_OR_SSE, **INFERENCE_ERRORS})
        app.post("/v1/completions", **inference)(self.completions)
        app.post("/v1/chat/completions", **inference)(self.chat_completions)
        app.get("/v1/models", dependencies=user, responses=error_responses(401, 405))(self.models)

    def _check_fields(self, body: S._SamplingFields, route: str) -> None:
        for name in body.model_extra or {}:
            if name not in _IGNORED:
                why = _REFUSED.get(name, "this server does not know the field")
                raise APIError(
                    400,
                    f"{name} is not supported on {route}: {why} (docs/compatibility.md lists every field)",
                    param=name,
                )
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported: expected null or {}", param="logit_bias")
        if body.tools:
            raise APIError(
                400, "tools are not supported: this server has no tool-call parser; expected null or []", param="tools"
            )
        if body.tool_choice not in (None, "none", "auto"):
            raise APIError.invalid("tool_choice", body.tool_choice, "null, 'none' or 'auto' (no tools are supported)")
        if body.response_format is not None and body.response_format != {"type": "text"}:
            raise APIError.invalid(
                "response_format", body.response_format, "null or {'type': 'text'} (structured output is not supported)"
            )

    # -- /v1/completions -----------------------------------------------------------------
    async def completions(self, body: S.CompletionRequest, request: Request) -> Response:
        self.core.check_model(body.model)
        self._check_fields(body, "/v1/completions")
        if body.suffix:
            raise APIError(400, "suffix is not supported: expected null", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(
                400, f"best_of={body.best_of} is not supported: expected null or n={body.n}", param="best_of"
            )
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        params = sampling_params(body, max_tokens, body.logprobs, prompt_logprobs=self._prompt_k(body))
        p = body.prompt
        prompts: list = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        fields = Fields("prompt")
        prepared = await self.core.prepare(prompts, params, fields)
        rid = self.core.request_id(body.request_id, "cmpl")
        gens = self.core.start_requests(prepared, params, rid, body.stream)
        track = Track(self.core.metrics, len(prepared) * params.n)
        if body.stream:
            return await self.core.sse(
                request, self._completion_events(body, rid, prepared, gens, track), track, rid, fields
            )
        outs = await self.core.run_collect(request, gens, rid, fields, track.left)

        def build() -> dict:
            choices = [
                self._completion_choice(body, i, o, c, first=True, offset=0)
                for i, o in enumerate(outs)
                for c in o.outputs
            ]
            return {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.core.model_name,
                "choices": choices,
                "usage": usage_of(outs),
            }

        work = work_of(outs, body.logprobs) + sum(len(o.prompt_token_ids) for o in outs) * (params.prompt_logprobs or 0)
        return await self.core.respond(build, work)

    @staticmethod
    def _prompt_k(body: S.CompletionRequest) -> int | None:
        """Prompt logprobs the engine computes: for prompt_logprobs, and for echo with logprobs."""
        echo_k = body.logprobs if body.echo else None
        ks = [k for k in (body.prompt_logprobs, echo_k) if k is not None]
        return max(ks) if ks else None

    def _completion_choice(
        self, body: S.CompletionRequest, i: int, o: RequestOutput, c: CompletionOutput, first: bool, offset: int
    ) -> dict[str, Any]:
        """One choice, whole or (streaming) one chunk; `first`: the choice's first chunk, which
        carries the echoed prompt and the prompt logprobs."""
        as_ids = body.return_tokens_as_token_ids
        echo = body.echo and first
        text = (self._prompt_text(o) if echo else "") + c.text
        logprobs = None
        if body.logprobs is not None:
            tt, k = self.core.token_text, body.logprobs
            if echo:
                head = completion_logprobs(
                    tt,
                    o.prompt_token_ids,
                    o.prompt_token_logprobs or [None] * len(o.prompt_token_ids),
                    o.prompt_top_logprobs,
                    k,
                    as_ids,
                    offset,
                )
                offset += sum(len(tt(t)) for t in o.prompt_token_ids)
            logprobs = completion_logprobs(tt, c.token_ids, c.token_logprobs or [], c.top_logprobs, k, as_ids, offset)
            if echo:
                logprobs = join_completion_logprobs(head, logprobs)
        choice: dict[str, Any] = {
            "index": i * body.n + c.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }
        if c.finish_reason is not None or first:
            choice["stop_reason"] = c.stop_reason
        if body.prompt_logprobs is not None and first:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(o, body.prompt_logprobs, as_ids)
        if body.return_token_ids:
            choice["token_ids"] = c.token_ids
            choice["weight_version"] = c.weight_version
            if first:
                choice["prompt_token_ids"] = o.prompt_token_ids
            if c.finish_reason is not None:
                choice["weight_spans"] = [[s.version, s.start, s.end] for s in c.weight_spans]
        return choice

    def _prompt_text(self, o: RequestOutput) -> str:
        if o.prompt is not None:
            return o.prompt
        tok = self.core.engine.tokenizer
        return tok.decode(o.prompt_token_ids) if tok is not None else ""

    async def _completion_events(
        self, body: S.CompletionRequest, rid: str, prepared, gens, track: Track
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        offsets: dict[int, int] = {}
        totals: dict[tuple[int, int], int] = {}
        async for i, out in merge(gens, track):
            track.tokens(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                idx = i * body.n + c.index
                first = idx not in offsets
                if not first and not c.token_ids and not c.text and c.finish_reason is None:
                    continue
                totals[(i, c.index)] = totals.get((i, c.index), 0) + len(c.token_ids)
                offset = offsets.get(idx, 0)
                choice = self._completion_choice(body, i, out, c, first, offset)
                ids = [*(out.prompt_token_ids if body.echo and first else ()), *c.token_ids]
                offsets[idx] = offset + sum(len(self.core.token_text(t)) for t in ids)
                if c.finish_reason is not None:
                    track.finish(c.finish_reason)
                yield event(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": self.core.model_name,
                        "choices": [choice],
                    }
                )
        prompt_tokens = sum(len(t) for _, t in prepared)
        self.core.metrics.prompt_tokens.labels(self.core.model_name).inc(prompt_tokens)
        if body.stream_options is not None and body.stream_options.include_usage:
            comp = sum(totals.values())
            yield event(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": self.core.model_name,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": comp,
                        "total_tokens": prompt_tokens + comp,
                    },
                }
            )
        yield b"data: [DONE]\n\n"

    # -- /v1/chat/completions ------------------------------------------------------------
    async def chat_completions(self, body: S.ChatCompletionRequest, request: Request) -> Response:
        self.core.check_model(body.model)
        self._check_fields(body, "/v1/chat/completions")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        ids = await self._chat_prompt(body)
        limit = self.core.engine.max_model_len
        if len(ids) >= limit:
            raise APIError(
                400,
                f"messages are {len(ids)} tokens after the chat template: expected fewer than max_model_len={limit}",
                param="messages",
            )
        max_tokens = body.max_completion_tokens or body.max_tokens or (limit - len(ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens, logprobs, prompt_logprobs=body.prompt_logprobs)
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
                choice = {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._chat_logprobs(body, c),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                if body.return_token_ids:
                    choice.update(
                        token_ids=c.token_ids,
                        weight_version=c.weight_version,
                        weight_spans=[[s.version, s.start, s.end] for s in c.weight_spans],
                    )
                choices.append(choice)
            resp = {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.core.model_name,
                "choices": choices,
                "usage": usage_of(outs),
            }
            if body.return_token_ids:
                resp["prompt_token_ids"] = o.prompt_token_ids
            if body.prompt_logprobs is not None:
                resp["prompt_logprobs"] = vllm_prompt_logprobs(o, body.prompt_logprobs, body.return_tokens_as_token_ids)
            return resp

        work = work_of(outs, logprobs) + len(outs[0].prompt_token_ids) * (body.prompt_logprobs or 0)
        return await self.core.respond(build, work)

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
            raise APIError(
                400,
                f"messages are {chars} characters: expected at most {self.core.max_prompt_chars} "
                f"(they cannot fit in max_model_len={self.core.engine.max_model_len} tokens)",
                param="messages",
            )

        def render() -> list[int]:
            try:
                text = tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=body.add_generation_prompt
                )
                return list(tok.encode(text, add_special_tokens=False))
            except Exception as e:  # a template may reject roles or orderings
                raise APIError(
                    400, f"messages could not be rendered with the chat template: {e}", param="messages"
                ) from None

        return await asyncio.to_thread(render) if chars > INLINE_CHARS else render()

    def _chat_logprobs(self, body: S.ChatCompletionRequest, c: CompletionOutput) -> dict | None:
        if not body.logprobs:
            return None
        return chat_logprobs(self.core.token_text, c, body.top_logprobs or 0, body.return_tokens_as_token_ids)

    async def _chat_events(
        self, body: S.ChatCompletionRequest, rid: str, prepared, gens, track: Track
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        started: set[int] = set()
        total = 0
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.core.model_name}
        async for _, out in merge(gens, track):
            track.tokens(sum(len(c.token_ids) for c in out.outputs))
            for c in out.outputs:
                if c.index not in started:
                    started.add(c.index)
                    delta0 = {"role": "assistant", "content": ""}
                    head: dict[str, Any] = {
                        **base,
                        "choices": [{"index": c.index, "delta": delta0, "logprobs": None, "finish_reason": None}],
                    }
                    if body.prompt_logprobs is not None and c.index == 0:
                        head["prompt_logprobs"] = vllm_prompt_logprobs(
                            out, body.prompt_logprobs, body.return_tokens_as_token_ids
                        )
                    if body.return_token_ids and c.index == 0:
                        head["prompt_token_ids"] = out.prompt_token_ids
                    yield event(head)
                if not c.token_ids and not c.text and c.finish_reason is None:
                    continue
                total += len(c.token_ids)
                delta = {"content": c.text} if (c.text or c.finish_reason is None) else {}
                choice: dict[str, Any] = {
                    "index": c.index,
                    "delta": delta,
                    "logprobs": self._chat_logprobs(body, c),
                    "finish_reason": c.finish_reason,
                }
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
            yield event(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": total,
                        "total_tokens": prompt_tokens + total,
                    },
                }
            )
        yield b"data: [DONE]\n\n"

    async def models(self) -> Response:
        c = self.core.client
        return json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.core.model_name,
                        "object": "model",
                        "created": self.core.created,
                        "owned_by": "tidal",
                        "root": c.model_path if c else None,
                        "max_model_len": c.max_model_len if c else None,
                    }
                ],
            }
        )


# -- logprobs in OpenAI's and vLLM's shapes (also used by vllm_routes) -----------------------------
def token_name(tt: TokenText, tid: int, as_ids: bool) -> str:
    return f"token_id:{tid}" if as_ids else tt(tid)


def top_dict(tt: TokenText, top: dict[int, float], k: int, as_ids: bool) -> dict[str, float]:
    """The k best of {token id: logprob} keyed by token text. Two tokens can decode to the same
    text (say, two lone UTF-8 continuation bytes): the later one is keyed "token_id:<id>" then, so
    every one of the k entries is kept and none takes another's value."""
    out: dict[str, float] = {}
    for tid, lp in itertools.islice(top.items(), k):
        key = token_name(tt, tid, as_ids)
        out[f"token_id:{tid}" if key in out else key] = lp
    return out


def completion_logprobs(
    tt: TokenText,
    ids: list[int],
    lps: Sequence[float | None],
    tops: Sequence[dict[int, float] | None] | None,
    k: int,
    as_ids: bool,
    offset: int,
) -> dict:
    """/v1/completions' logprobs object for tokens `ids`; text offsets count from `offset`."""
    offsets = []
    for t in ids:
        offsets.append(offset)
        offset += len(tt(t))
    top = [_with_sampled(tt, t, lp, d, k, as_ids) for t, lp, d in zip(ids, lps, tops or [None] * len(ids))]
    return {
        "tokens": [token_name(tt, t, as_ids) for t in ids],
        "token_logprobs": list(lps),
        "top_logprobs": top,
        "text_offset": offsets,
    }


def _with_sampled(
    tt: TokenText, tid: int, lp: float | None, top: dict[int, float] | None, k: int, as_ids: bool
) -> dict[str, float] | None:
    """One position's top_logprobs as vLLM gives them: the k best plus the token itself when it
    is not among them (so logprobs=0 still has an entry per position, as TRL reads it)."""
    if lp is None:
        return None
    best = dict(itertools.islice(top.items(), k)) if top is not None else {}
    out = top_dict(tt, best, k, as_ids)
    if tid not in best:
        key = token_name(tt, tid, as_ids)
        out[f"token_id:{tid}" if key in out else key] = lp
    return out


def join_completion_logprobs(head: dict, tail: dict) -> dict:
    """The echoed prompt's logprobs, then the completion's."""
    if head["top_logprobs"] is None and tail["top_logprobs"] is None:
        top = None
    else:
        top = [*(head["top_logprobs"] or [None] * len(head["tokens"])), *(tail["top_logprobs"] or [])]
    return {
        "tokens": head["tokens"] + tail["tokens"],
        "token_logprobs": head["token_logprobs"] + tail["token_logprobs"],
        "top_logprobs": top,
        "text_offset": head["text_offset"] + tail["text_offset"],
    }


def chat_logprobs(tt: TokenText, c: CompletionOutput, k: int, as_ids: bool) -> dict:
    """Chat's {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    content = []
    tops = c.top_logprobs
    for i, (t, lp) in enumerate(zip(c.token_ids, c.token_logprobs or [])):
        top = []
        if tops is not None and i < len(tops):
            top = [_chat_entry(tt, a, b, as_ids) for a, b in itertools.islice(tops[i].items(), k)]
        content.append({**_chat_entry(tt, t, lp, as_ids), "top_logprobs": top})
    return {"content": content}


def _chat_entry(tt: TokenText, tid: int, lp: float, as_ids: bool) -> dict:
    name = token_name(tt, tid, as_ids)
    return {"token": name, "logprob": lp, "bytes": list(tt(tid).encode())}


def vllm_prompt_logprobs(o: RequestOutput, k: int, as_ids: bool) -> list | None:
    """vLLM's prompt_logprobs: per prompt token null (the first) or {"<id>": {logprob, rank,
    decoded_token}}: the prompt token itself, then the k best."""
    if o.prompt_token_logprobs is None:
        return None
    out: list[dict | None] = []
    for i, (tid, lp) in enumerate(zip(o.prompt_token_ids, o.prompt_token_logprobs)):
        if lp is None:
            out.append(None)
            continue
        ranks = o.prompt_token_ranks
        entry = {str(tid): _vllm_entry(o, tid, lp, ranks[i] if ranks else None, as_ids)}
        tops = o.prompt_top_logprobs[i] if o.prompt_top_logprobs else None
        for rank, (alt, alt_lp) in enumerate(itertools.islice((tops or {}).items(), k), start=1):
            entry.setdefault(str(alt), _vllm_entry(o, alt, alt_lp, rank, as_ids))
        out.append(entry)
    return out


def _vllm_entry(o: RequestOutput, tid: int, lp: float, rank: int | None, as_ids: bool) -> dict:
    text = f"token_id:{tid}" if as_ids else (o.decode(tid) if o.decode is not None else None)
    return {"logprob": lp, "rank": rank, "decoded_token": text}
