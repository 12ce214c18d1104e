"""POST /generate in SGLang's shape (GenerateReqInput in, {text, output_ids, meta_info} out),
with Tidal's token-API fields kept alongside (DESIGN.md §6, docs/compatibility.md).

One prompt or a batch (`text` | `input_ids`), each prompt its own engine request; a batch or
n > 1 answers a list, prompt-major. Streaming follows SGLang: each event carries the sample's
output so far (cumulative); `incremental_streaming_output=true` (SGLang's server flag, here per
request) sends only what is new, which is Tidal's original form and what its router reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from tidal.outputs import CompletionOutput, RequestOutput
from tidal.sampling_params import SamplingParams
from tidal.server import schemas as S
from tidal.server.errors import APIError
from tidal.server.service import (
    INFERENCE_ERRORS,
    JSON_OR_SSE,
    Fields,
    ServerCore,
    Track,
    WeightLabels,
    _stops,
    event,
    merge,
    sampling_error,
    work_of,
)


@dataclass(slots=True)
class _Prompt:
    """One prompt of a /generate call and how its samples are reported."""

    rid: str
    text: str | None
    ids: list[int]
    params: SamplingParams
    first_index: int  # its samples' place in the answer's list
    logprob_start: int  # -1: no prompt logprobs
    prior_output_tokens: int  # trailing prompt tokens that are earlier output of the sample


class GenerateRoutes:
    """POST /generate."""

    def __init__(self, core: ServerCore, labels: WeightLabels) -> None:
        self.core = core
        self.labels = labels
        self.groups: dict[str, list[str]] = {}  # a caller's rid -> the engine ids running under it

    def register(self, app: FastAPI, user: list) -> None:
        app.post("/generate", dependencies=user, responses={**JSON_OR_SSE, **INFERENCE_ERRORS})(self.generate)

    def engine_ids(self, rid: str) -> list[str]:
        return self.groups.get(rid, [rid])

    # -- request -------------------------------------------------------------------------
    async def generate(self, body: S.GenerateRequest, request: Request) -> Response:
        self.core.check_model(body.model)
        prompts, batch = self._prompts(body)
        sps = self._sampling_list(body.sampling_params, len(prompts), batch)
        rids, label = self._rids(body, len(prompts), batch)
        priors = self._priors(body, len(prompts), batch)
        fields = Fields("input_ids" if body.input_ids is not None else "text", "sampling_params.")
        jobs, first = [], 0
        for i, (p, sp, rid, prior) in enumerate(zip(prompts, sps, rids, priors)):
            prefix = f"sampling_params.{i}." if isinstance(body.sampling_params, list) else "sampling_params."
            params = self._params(body, sp, prefix)
            ((text, ids),) = await self.core.prepare([p], params, fields)
            start = self._logprob_start(body, len(ids))
            if prior > len(ids):
                raise APIError.invalid(
                    self._prior_field(body, i), prior, f"an integer <= the prompt's length ({len(ids)} tokens)"
                )
            jobs.append(_Prompt(rid, text, ids, params, first, start, prior))
            first += params.n
        incremental = body.stream and body.incremental_streaming_output
        gens = [
            self.core.engine.generate(
                j.text,
                j.params,
                request_id=j.rid,
                stream=body.stream,
                delta=incremental,
                timeout_s=body.timeout_s,
                prompt_token_ids=j.ids,
                prior_output_tokens=j.prior_output_tokens,
            )
            for j in jobs
        ]
        track = Track(self.core.metrics, first)
        self.groups[label] = rids
        try:
            if body.stream:
                events = self._events(body, jobs, gens, track, incremental, label)
                return await self.core.sse(request, events, track, label, fields, body.timeout_s)
            outs = await self.core.run_collect(request, gens, label, fields, track.left, body.timeout_s)
        finally:
            if not body.stream:
                self.groups.pop(label, None)

        def build() -> Any:
            samples = [self._sample(body, j, o, c, final=True) for j, o in zip(jobs, outs) for c in o.outputs]
            return samples[0] if len(samples) == 1 and not batch else samples

        return await self.core.respond(build, work_of(outs, body.top_logprobs_num))

    @staticmethod
    def _prompts(body: S.GenerateRequest) -> tuple[list, bool]:
        text, ids = body.text, body.input_ids
        if text is not None and ids is None:
            return ([text], False) if isinstance(text, str) else (list(text), True)
        if ids is not None and text is None:
            return (list(ids), True) if isinstance(ids[0], list) else ([ids], False)
        raise APIError(400, "give exactly one of input_ids or text", param="input_ids")

    @staticmethod
    def _sampling_list(sp, count: int, batch: bool) -> list[S.GenerateSamplingParams]:
        if not isinstance(sp, list):
            return [sp] * count
        if not batch or len(sp) != count:
            raise APIError.invalid(
                "sampling_params", f"a list of {len(sp)}", f"one object, or a list of one per prompt ({count})"
            )
        return sp

    def _rids(self, body: S.GenerateRequest, count: int, batch: bool) -> tuple[list[str], str]:
        if body.rid is not None and body.request_id is not None:
            raise APIError(
                400, "rid and request_id are the same field (SGLang's and Tidal's name): give one", param="rid"
            )
        given = body.rid if body.rid is not None else body.request_id
        if isinstance(given, list):
            if not batch or len(given) != count or len(set(given)) != count:
                raise APIError.invalid("rid", given, f"one distinct id per prompt ({count})")
            return [self.core.request_id(r, "gen") for r in given], given[0]
        rid = self.core.request_id(given, "gen")
        return ([rid] if not batch else [f"{rid}-{i}" for i in range(count)]), rid

    @staticmethod
    def _priors(body: S.GenerateRequest, count: int, batch: bool) -> list[int]:
        k = body.prior_output_tokens
        if not isinstance(k, list):
            return [k] * count
        if not batch or len(k) != count:
            raise APIError.invalid("prior_output_tokens", k, f"one integer, or a list of one per prompt ({count})")
        return k

    @staticmethod
    def _prior_field(body: S.GenerateRequest, i: int) -> str:
        return f"prior_output_tokens.{i}" if isinstance(body.prior_output_tokens, list) else "prior_output_tokens"

    @staticmethod
    def _pick(sp: S.GenerateSamplingParams, sglang: str, tidal: str, default: Any) -> Any:
        a, b = getattr(sp, sglang), getattr(sp, tidal)
        if a is not None and b is not None and a != b:
            raise APIError(
                400,
                f"sampling_params.{sglang}={a} and sampling_params.{tidal}={b} are the same "
                "field (SGLang's and Tidal's name): give one",
                param=f"sampling_params.{sglang}",
            )
        return a if a is not None else b if b is not None else default

    def _params(self, body: S.GenerateRequest, sp: S.GenerateSamplingParams, prefix: str) -> SamplingParams:
        max_tokens = self._pick(sp, "max_new_tokens", "max_tokens", 16)
        min_tokens = self._pick(sp, "min_new_tokens", "min_tokens", 0)
        if min_tokens > max_tokens:
            raise APIError.invalid(prefix + "min_new_tokens", min_tokens, f"an integer <= max_new_tokens={max_tokens}")
        if max_tokens == 0 and sp.n != 1:
            raise APIError.invalid(prefix + "n", sp.n, "1 when max_new_tokens=0 (nothing is sampled)")
        top = sp.logprobs if sp.logprobs is not None else body.top_logprobs_num
        if sp.logprobs is not None and body.top_logprobs_num not in (0, sp.logprobs):
            raise APIError(
                400,
                "top_logprobs_num and sampling_params.logprobs are the same field (SGLang's and "
                "Tidal's name): give one",
                param="top_logprobs_num",
            )
        wants = body.return_logprob or sp.logprobs is not None
        prompt_lp = top if body.return_logprob and body.logprob_start_len >= 0 else None
        try:
            return SamplingParams(
                n=sp.n,
                temperature=sp.temperature,
                top_p=sp.top_p,
                top_k=sp.top_k,
                min_p=sp.min_p,
                seed=self._pick(sp, "sampling_seed", "seed", None),
                max_tokens=max_tokens,
                min_tokens=min_tokens,
                stop=_stops(sp.stop),
                stop_token_ids=list(sp.stop_token_ids or []),
                ignore_eos=sp.ignore_eos,
                logprobs=top if wants else None,
                skip_special_tokens=sp.skip_special_tokens,
                logprobs_mode=sp.logprobs_mode,
                repetition_penalty=sp.repetition_penalty,
                presence_penalty=sp.presence_penalty,
                frequency_penalty=sp.frequency_penalty,
                include_stop_str_in_output=sp.no_stop_trim,
                prompt_logprobs=prompt_lp,
            )
        except ValueError as e:  # what the schema cannot see
            raise sampling_error(e, prefix) from None

    @staticmethod
    def _logprob_start(body: S.GenerateRequest, prompt_len: int) -> int:
        start = body.logprob_start_len if body.return_logprob else -1
        if start >= prompt_len:
            raise APIError.invalid(
                "logprob_start_len",
                start,
                f"-1 (no prompt logprobs) or an integer below the prompt's length ({prompt_len} tokens)",
            )
        return start

    # -- response ------------------------------------------------------------------------
    def _sample(
        self,
        body: S.GenerateRequest,
        job: _Prompt,
        o: RequestOutput,
        c: CompletionOutput,
        final: bool,
        completion_tokens: int | None = None,
        prompt_logprobs: bool = True,
    ) -> dict:
        done = len(c.token_ids) if completion_tokens is None else completion_tokens
        meta: dict[str, Any] = {
            "id": o.request_id,
            "finish_reason": self._finish(c, job.params),
            "prompt_tokens": len(job.ids),
            "completion_tokens": done,
            "cached_tokens": o.num_cached_tokens,
            "weight_version": self.labels.label(c.weight_version),
        }
        if body.return_logprob:
            self._output_logprobs(meta, c, body)
            if job.logprob_start >= 0 and prompt_logprobs and o.prompt_token_logprobs is not None:
                self._input_logprobs(meta, o, job.logprob_start, body)
        d = {
            "text": c.text,
            "output_ids": c.token_ids,
            "meta_info": meta,
            # Tidal's token-API fields (kept for its callers; docs/compatibility.md)
            "request_id": o.request_id,
            "index": job.first_index + c.index,
            "output_logprobs": c.token_logprobs,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
            "weight_version": c.weight_version,
            "prompt_tokens": len(job.ids),
            "completion_tokens": done,
        }
        if c.top_logprobs is not None:
            d["output_top_logprobs"] = [{str(k): v for k, v in t.items()} for t in c.top_logprobs]
        if final or c.finish_reason is not None:
            d["weight_spans"] = meta["weight_spans"] = [[s.version, s.start, s.end] for s in c.weight_spans]
        return d

    @staticmethod
    def _finish(c: CompletionOutput, params: SamplingParams) -> dict | None:
        if c.finish_reason == "stop":
            return {"type": "stop", "matched": c.stop_reason}
        if c.finish_reason == "length":
            return {"type": "length", "length": params.max_tokens}
        if c.finish_reason == "abort":
            return {"type": "abort", "message": "the request was aborted"}
        return None if c.finish_reason is None else {"type": c.finish_reason}

    def _entry(self, lp: float | None, tid: int, text: bool) -> list:
        return [lp, tid, self.core.token_text(tid) if text else None]

    def _tops(self, tops: Sequence[dict[int, float] | None], text: bool) -> list:
        return [None if t is None else [self._entry(v, k, text) for k, v in t.items()] for t in tops]

    def _output_logprobs(self, meta: dict, c: CompletionOutput, body: S.GenerateRequest) -> None:
        text = body.return_text_in_logprobs
        lps = c.token_logprobs or []
        meta["output_token_logprobs"] = [self._entry(lp, t, text) for lp, t in zip(lps, c.token_ids)]
        if body.top_logprobs_num > 0 or c.top_logprobs is not None:
            meta["output_top_logprobs"] = self._tops(c.top_logprobs or [], text)

    def _input_logprobs(self, meta: dict, o: RequestOutput, start: int, body: S.GenerateRequest) -> None:
        text = body.return_text_in_logprobs
        ids, lps = o.prompt_token_ids[start:], (o.prompt_token_logprobs or [])[start:]
        meta["input_token_logprobs"] = [self._entry(lp, t, text) for lp, t in zip(lps, ids)]
        if body.top_logprobs_num > 0:
            meta["input_top_logprobs"] = self._tops(
                (o.prompt_top_logprobs or [None] * len(o.prompt_token_ids))[start:], text
            )

    async def _events(
        self, body: S.GenerateRequest, jobs: list[_Prompt], gens, track: Track, incremental: bool, label: str
    ) -> AsyncIterator[bytes]:
        counts: dict[int, int] = {}  # sample place -> tokens reported so far
        sent_prompt: set[int] = set()
        finished: set[int] = set()  # a cumulative stream repeats a finished sample: send it once
        try:
            async for i, out in merge(gens, track):
                job = jobs[i]
                for c in out.outputs:
                    place = job.first_index + c.index
                    if place in finished:
                        continue
                    before = counts.get(place, 0)
                    now = before + len(c.token_ids) if incremental else len(c.token_ids)
                    new = now - before
                    if new == 0 and not (incremental and c.text) and c.finish_reason is None:
                        continue
                    track.tokens(new)
                    counts[place] = now
                    if c.finish_reason is not None:
                        track.finish(c.finish_reason)
                        finished.add(place)
                    yield event(
                        self._sample(
                            body, job, out, c, final=False, completion_tokens=now, prompt_logprobs=i not in sent_prompt
                        )
                    )
                    sent_prompt.add(i)
            self.core.metrics.prompt_tokens.labels(self.core.model_name).inc(sum(len(j.ids) for j in jobs))
            yield b"data: [DONE]\n\n"
        finally:
            self.groups.pop(label, None)
