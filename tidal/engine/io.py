"""Both ends of a request outside the core loop: prompt validation before a request is
sent, and assembling the core's token deltas into RequestOutputs (with detokenization) after."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tidal.engine.messages import EngineInvalidInput, EngineOutput
from tidal.outputs import CompletionOutput, Decoder, RequestOutput, WeightSpan
from tidal.sampling_params import SamplingParams

Prompt = str | list[int]
PromptInput = Prompt | Mapping[str, Any]  # also vLLM's prompt dicts (unwrap_prompt)
_PROMPT_KEYS = ("prompt", "prompt_token_ids")


class InputProcessor:
    def __init__(self, tokenizer, max_model_len: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    def process(self, prompt: Prompt | None, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Token ids of `prompt`, or a ValueError naming what is wrong. Changes no state."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt='' is invalid: expected a non-empty string or token-id list")
            if self.tokenizer is None:
                raise ValueError("prompt is a string but the model has no tokenizer: pass token ids")
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
            text: str | None = prompt
        elif isinstance(prompt, (list, tuple)):
            ids, text = list(prompt), None
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt_token_ids contains {bad[:5]}: expected integers in [0, {self.vocab_size})")
        else:
            raise ValueError(f"prompt of type {type(prompt).__name__} is invalid: expected str or list[int]")
        if not ids:
            raise ValueError("prompt is empty after tokenization: expected at least one token")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                f"{len(ids) + params.max_tokens} exceeds the model's context: expected "
                f"at most max_model_len={self.max_model_len}"
            )
        return text, ids


def check_prior_output_tokens(value: object, prompt_len: int) -> int:
    """`prior_output_tokens` (how many trailing prompt tokens are earlier output of the same
    sample), or EngineInvalidInput naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= prompt_len:
        raise EngineInvalidInput(
            "prior_output_tokens", value, f"an integer in [0, {prompt_len}] (the prompt has {prompt_len} tokens)"
        )
    return value


@dataclass(slots=True)
class RequestState:
    """Accumulates one request's outputs; `delta` mode yields only what is new."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    tokenizer: Any  # a transformers tokenizer, or None
    stream: bool = False
    completions: list[CompletionOutput] = field(default_factory=list)
    detoks: list = field(default_factory=list)
    error: str | None = None
    error_type: str | None = None  # EngineOutput.error_type of the first error
    error_param: str | None = None
    sent_tokens: list[int] = field(default_factory=list)  # per sample, for delta outputs
    sent_text: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    # Prompt logprobs (SamplingParams.prompt_logprobs), vLLM's layout: entry 0 is None.
    prompt_logprobs: list[float | None] | None = None
    prompt_ranks: list[int | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    prompt_sent: bool = False  # delta outputs carry the prompt logprobs once
    decode: Decoder | None = None

    def __post_init__(self) -> None:
        want_lp = self.params.logprobs is not None
        if self.tokenizer is not None:
            self.decode = _token_decoder(self.tokenizer)
        self.completions = [
            CompletionOutput(
                i,
                token_logprobs=[] if want_lp else None,
                top_logprobs=[] if self.params.logprobs else None,
                token_ranks=[] if want_lp else None,
                decode=self.decode,
            )
            for i in range(self.params.n)
        ]
        self.sent_tokens = [0] * self.params.n
        self.sent_text = [0] * self.params.n
        if self.stream and self.tokenizer is not None:
            from tidal.engine.detokenizer import IncrementalDetokenizer

            self.detoks = [
                IncrementalDetokenizer(self.tokenizer, self.prompt_token_ids, self.params.skip_special_tokens)
                for _ in range(self.params.n)
            ]

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)

    def apply(self, out: EngineOutput) -> None:
        c = self.completions[out.index]
        c.token_ids.extend(out.new_token_ids)
        if c.token_logprobs is not None and out.new_logprobs is not None:
            c.token_logprobs.extend(out.new_logprobs)
        if c.token_ranks is not None and out.new_ranks is not None:
            c.token_ranks.extend(out.new_ranks)
        if c.top_logprobs is not None and out.new_top_logprobs is not None:
            c.top_logprobs.extend(out.new_top_logprobs)
        if out.index == 0:
            self.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = [None, *out.prompt_logprobs]
            self.prompt_ranks = [None, *(out.prompt_ranks or [])]
            if out.prompt_top_logprobs is not None:
                self.prompt_top_logprobs = [None, *out.prompt_top_logprobs]
        c.weight_version = out.weight_version
        if self.detoks:
            c.text += self.detoks[out.index].push(out.new_token_ids)
        if out.error and self.error is None:
            self.error, self.error_type, self.error_param = out.error, out.error_type, out.error_param
        if out.finish_reason is not None:
            c.finish_reason = out.finish_reason
            c.stop_reason = out.stop_reason
            if out.weight_spans:
                c.weight_spans = [WeightSpan(*s) for s in out.weight_spans]
            if self.detoks:
                self.detoks[out.index].flush()  # emit held-back partial characters, as decode() does
                c.text = self.detoks[out.index].text
            elif self.tokenizer is not None:
                c.text = self.tokenizer.decode(c.token_ids, skip_special_tokens=self.params.skip_special_tokens)
            if isinstance(c.stop_reason, str):
                cut = c.text.find(c.stop_reason)
                if cut >= 0:
                    keep = len(c.stop_reason) if self.params.include_stop_str_in_output else 0
                    c.text = c.text[: cut + keep]

    def delta_output(self) -> RequestOutput:
        """Only what is new since the last delta. Text that could still turn out to be the
        start of a stop string is held back until the sample finishes."""
        hold = max((len(s) for s in self.params.stop), default=1) - 1
        outs = []
        for i, c in enumerate(self.completions):
            t0, x0 = self.sent_tokens[i], self.sent_text[i]
            x1 = len(c.text) if c.finished() else max(x0, len(c.text) - hold)
            outs.append(
                CompletionOutput(
                    c.index,
                    c.token_ids[t0:],
                    c.text[x0:x1],
                    None if c.token_logprobs is None else c.token_logprobs[t0:],
                    None if c.top_logprobs is None else c.top_logprobs[t0:],
                    c.finish_reason,
                    c.stop_reason,
                    c.weight_version,
                    list(c.weight_spans),
                    None if c.token_ranks is None else c.token_ranks[t0:],
                    c.decode,
                )
            )
            self.sent_tokens[i], self.sent_text[i] = len(c.token_ids), x1
        out = self._request_output(outs, with_prompt=not self.prompt_sent)
        self.prompt_sent = self.prompt_sent or self.prompt_logprobs is not None
        return out

    def output(self) -> RequestOutput:
        return self._request_output([_copy(c) for c in self.completions], with_prompt=True)

    def _request_output(self, outs: list[CompletionOutput], with_prompt: bool) -> RequestOutput:
        out = RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            outs,
            self.finished,
            self.num_cached_tokens,
            decode=self.decode,
        )
        if with_prompt and self.prompt_logprobs is not None:
            out.prompt_token_logprobs = list(self.prompt_logprobs)
            out.prompt_token_ranks = list(self.prompt_ranks or ())
            if self.prompt_top_logprobs is not None:
                out.prompt_top_logprobs = list(self.prompt_top_logprobs)
        return out


def raise_for_error(state: RequestState) -> None:
    """The exception a caller of LLM/AsyncLLM gets for a request the engine ended with an error."""
    from tidal.engine.messages import EngineDead, EngineInvalidInput, EngineNotServing

    error = state.error
    if error is None:
        return
    if state.error_type == "invalid_input":
        raise EngineInvalidInput(state.error_param or "request", None, "a request the engine can schedule", error)
    if state.error_type == "not_serving" or error.startswith("rejected"):
        raise EngineNotServing(error)
    raise EngineDead(error)


def _copy(c: CompletionOutput) -> CompletionOutput:
    return CompletionOutput(
        c.index,
        list(c.token_ids),
        c.text,
        None if c.token_logprobs is None else list(c.token_logprobs),
        None if c.top_logprobs is None else list(c.top_logprobs),
        c.finish_reason,
        c.stop_reason,
        c.weight_version,
        list(c.weight_spans),
        None if c.token_ranks is None else list(c.token_ranks),
        c.decode,
    )


def _token_decoder(tokenizer) -> Decoder:
    """One token's text, for Logprob.decoded_token (special tokens spelled out, as vLLM does)."""

    @functools.lru_cache(maxsize=4096)
    def decode(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    return decode


def unwrap_prompt(prompt: PromptInput) -> Prompt:
    """A text or token-id prompt; vLLM's prompt dicts give theirs (one of the two keys, no other)."""
    if not isinstance(prompt, Mapping):
        return prompt
    keys = set(prompt)
    unknown = sorted(keys - set(_PROMPT_KEYS))
    if unknown:
        raise ValueError(f"prompt dict keys {unknown} are not supported: expected exactly one of {list(_PROMPT_KEYS)}")
    if len(keys) != 1:
        raise ValueError(f"prompt dict has keys {sorted(keys)}: expected exactly one of {list(_PROMPT_KEYS)}")
    if "prompt" in prompt:
        text = prompt["prompt"]
        if not isinstance(text, str):
            raise ValueError(f"prompt dict 'prompt'={text!r} is invalid: expected a string")
        return text
    ids = prompt["prompt_token_ids"]
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"prompt dict 'prompt_token_ids'={ids!r} is invalid: expected a list of token ids")
    return list(ids)
