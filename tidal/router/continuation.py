"""How a moved sample continues: its original request body → one `/generate` body over prompt +
tokens so far that carries every SamplingParams field of the original.

`sampling_state` reads a body of any surface into SamplingParams' own names and values (what the
replica made of it); `continuation_body` writes that state as Tidal's `/generate`, with the budget
reduced by what was produced. Tests build both sides through the server's parsers, field by
field over `dataclasses.fields(SamplingParams)`, so a new field cannot be dropped here unseen.

What a continuation keeps exactly, and what it cannot:
- greedy and seeded sampling: the continuation runs as sample 0 of an n=1 request with the
  sample's own seed (`derive_seed`) and `prior_output_tokens` = the tokens it already produced
  (plus any the original body declared): the engine's sampler keys its noise on (seed, output
  step) and counts those tokens as steps already taken, so a seeded sample continues the
  sequence an unmoved run produces (given the same weights and batch-invariant numerics);
- repetition_penalty counts prompt + output tokens, presence/frequency penalties output tokens:
  the tokens generated before the move are in the continuation's prompt, and the engine counts
  the last `prior_output_tokens` of it as output, so both count what an unmoved run counts;
- the budget: max_tokens and min_tokens are reduced by what was produced (the engine's budget
  fields count the request's own tokens), so the client sees the count it asked for;
- stop strings and stop ids apply after the move; one spanning the seam is not matched;
- prompt logprobs and echo belong to the first event, which the client already has; a request
  that moves before anything reached the client is re-sent whole instead (migrate.py).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from tidal.sampling_params import SamplingParams

# SamplingParams field -> its /generate sampling_params name; None: set on the body, not there.
GENERATE_NAME: dict[str, str | None] = {
    "n": "n",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "max_tokens": "max_tokens",
    "min_tokens": "min_tokens",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos",
    "logprobs": "logprobs",
    "skip_special_tokens": "skip_special_tokens",
    "logprobs_mode": "logprobs_mode",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "include_stop_str_in_output": "no_stop_trim",
    "prompt_logprobs": None,
}
_DEFAULTS = asdict(SamplingParams())
_SGLANG_ALIAS = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "sampling_seed": "seed",
    "no_stop_trim": "include_stop_str_in_output",
}


def derive_seed(seed: int, index: int) -> int:
    """The engine's per-sample seed (engine/core.py derive_seed; a test holds the two equal): the
    router does not import the engine (torch) to continue a sample."""
    if index == 0:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & 0x7FFFFFFFFFFFFFFF


def sampling_state(
    surface: str, body: dict, prompt_index: int = 0, prompt_len: int = 0, max_model_len: int | None = None
) -> dict[str, Any]:
    """Every SamplingParams field of the original request, as the replica read it from `body`."""
    if surface == "generate":
        return _generate_state(body, prompt_index)
    state = {k: body[k] for k in _DEFAULTS if k in body and body[k] is not None}
    state = {**_DEFAULTS, **state}
    if isinstance(state["stop"], str):
        state["stop"] = [state["stop"]]
    if surface == "chat":
        limit = (max_model_len or prompt_len + 1) - prompt_len
        state["max_tokens"] = body.get("max_completion_tokens") or body.get("max_tokens") or limit
        state["logprobs"] = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
    else:
        state["max_tokens"] = 16 if body.get("max_tokens") is None else body["max_tokens"]
        echo_k = body.get("logprobs") if body.get("echo") else None
        ks = [k for k in (body.get("prompt_logprobs"), echo_k) if k is not None]
        state["prompt_logprobs"] = max(ks) if ks else None
    return state


def _generate_state(body: dict, prompt_index: int) -> dict[str, Any]:
    sp = body.get("sampling_params") or {}
    if isinstance(sp, list):
        sp = sp[prompt_index]
    state = dict(_DEFAULTS)
    for key, value in sp.items():
        name = _SGLANG_ALIAS.get(key, key)
        if name in state and value is not None:
            state[name] = value
    if isinstance(state["stop"], str):
        state["stop"] = [state["stop"]]
    return_logprob = body.get("return_logprob", True)
    top = sp.get("logprobs") if sp.get("logprobs") is not None else body.get("top_logprobs_num", 0)
    state["logprobs"] = top if return_logprob or sp.get("logprobs") is not None else None
    start = body.get("logprob_start_len", -1)
    state["prompt_logprobs"] = top if return_logprob and start is not None and start >= 0 else None
    return state


def prior_output_tokens(surface: str, body: dict, prompt_index: int = 0) -> int:
    """How many trailing prompt tokens the original body declared earlier output of the sample
    (/generate's `prior_output_tokens`, one for all prompts or one per prompt); 0 elsewhere."""
    k = body.get("prior_output_tokens", 0) if surface == "generate" else 0
    if isinstance(k, list):
        k = k[prompt_index]
    return int(k or 0)


def continuation_body(
    state: dict[str, Any],
    input_ids: list[int],
    produced: int,
    sample_in_prompt: int,
    request_id: str,
    prior: int = 0,
) -> dict:
    """The `/generate` stream that continues one sample over `input_ids` (prompt + its tokens so
    far): the state's fields under /generate's names, n=1, the remaining budget, and the tokens
    produced (plus the original's own `prior` ones) declared earlier output of the sample."""
    sp = {GENERATE_NAME[k]: v for k, v in state.items() if GENERATE_NAME[k] is not None}
    sp.update(
        n=1,
        max_tokens=max(1, int(state["max_tokens"]) - produced),
        min_tokens=max(0, int(state["min_tokens"]) - produced),
    )
    if state["seed"] is not None:
        sp["seed"] = derive_seed(int(state["seed"]), sample_in_prompt)
    # every continuation is an incremental /generate stream: the router reads each event's new tokens
    return {
        "input_ids": input_ids,
        "sampling_params": sp,
        "stream": True,
        "request_id": request_id,
        "prior_output_tokens": prior + produced,
        "return_logprob": state["logprobs"] is not None,
        "incremental_streaming_output": True,
    }
