"""A moved sample's continuation body carries every SamplingParams field of its original request.

Both sides go through the server's own parsers: the original body as its surface reads it, the
continuation as /generate reads it. The cases iterate over `dataclasses.fields(SamplingParams)`,
so a field added there fails here until the router carries it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields

import pytest

from tidal.engine.core import derive_seed as engine_derive_seed
from tidal.router.continuation import continuation_body, derive_seed, prior_output_tokens, sampling_state
from tidal.sampling_params import SamplingParams
from tidal.server import schemas as S
from tidal.server.generate_routes import GenerateRoutes
from tidal.server.openai_routes import OpenAIRoutes
from tidal.server.service import sampling_params

FIELDS = [f.name for f in fields(SamplingParams)]
# A value other than the default for every field (a new field needs one here, and a surface writer).
CHANGED = {"n": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "seed": 1234, "max_tokens": 40,
           "min_tokens": 7, "stop": ["zz"], "stop_token_ids": [9], "ignore_eos": True, "logprobs": 3,
           "skip_special_tokens": False, "logprobs_mode": "processed", "repetition_penalty": 1.3,
           "presence_penalty": 0.5, "frequency_penalty": 0.25, "include_stop_str_in_output": True,
           "prompt_logprobs": 2}
MAX_MODEL_LEN, PROMPT = 256, [5, 6, 7, 8]


def _completions(values: dict) -> tuple[dict, SamplingParams]:
    body = {"prompt": PROMPT, **values}
    b = S.CompletionRequest.model_validate_json(json.dumps(body))
    return body, sampling_params(b, 16 if b.max_tokens is None else b.max_tokens, b.logprobs,
                                 prompt_logprobs=OpenAIRoutes._prompt_k(b))


def _chat(values: dict) -> tuple[dict, SamplingParams]:
    values = dict(values)
    if "logprobs" in values:       # chat asks for logprobs as a flag and a top-k
        values.update(logprobs=True, top_logprobs=values.pop("logprobs"))
    if "max_tokens" in values:     # chat's current name for max_tokens
        values["max_completion_tokens"] = values.pop("max_tokens")
    body = {"messages": [{"role": "user", "content": "hi"}], **values}
    b = S.ChatCompletionRequest.model_validate_json(json.dumps(body))
    max_tokens = b.max_completion_tokens or b.max_tokens or (MAX_MODEL_LEN - len(PROMPT))   # as the route does
    logprobs = (b.top_logprobs or 0) if b.logprobs else None
    return body, sampling_params(b, max_tokens, logprobs, prompt_logprobs=b.prompt_logprobs)


def _generate_params(body: dict) -> SamplingParams:
    b = S.GenerateRequest.model_validate_json(json.dumps(body))
    return GenerateRoutes._params(GenerateRoutes.__new__(GenerateRoutes), b, b.sampling_params, "sampling_params.")


def _generate(values: dict) -> tuple[dict, SamplingParams]:
    sp, top = dict(values), {"return_logprob": False}
    if "include_stop_str_in_output" in sp:     # SGLang's name
        sp["no_stop_trim"] = sp.pop("include_stop_str_in_output")
    if "max_tokens" in sp:
        sp["max_new_tokens"] = sp.pop("max_tokens")
    if "seed" in sp:
        sp["sampling_seed"] = sp.pop("seed")
    if "logprobs" in sp:
        top.update(return_logprob=True, top_logprobs_num=sp.pop("logprobs"))
    if "prompt_logprobs" in sp:                # /generate: prompt logprobs from logprob_start_len, at the same k
        sp.pop("prompt_logprobs")
        top.update(return_logprob=True, logprob_start_len=0)
    body = {"input_ids": PROMPT, "sampling_params": sp, **top}
    return body, _generate_params(body)


SURFACES = {"completions": _completions, "chat": _chat, "generate": _generate}
CASES = [(surface, name) for surface in SURFACES for name in [*FIELDS, "all"]]


@pytest.mark.parametrize(("surface", "name"), CASES, ids=[f"{s}-{n}" for s, n in CASES])
def test_continuation_carries_every_sampling_field(surface, name):
    values = dict(CHANGED) if name == "all" else {name: CHANGED[name]}
    body, original = SURFACES[surface](values)
    state = sampling_state(surface, body, 0, len(PROMPT), MAX_MODEL_LEN)
    assert state == asdict(original)            # the router reads the body as the replica did
    produced, sample = 3, 2
    cont = continuation_body(state, PROMPT + [1, 2, 3], produced, sample, "r.m1.2")
    moved = _generate_params(cont)
    want = {**asdict(original), "n": 1, "max_tokens": original.max_tokens - produced,
            "min_tokens": max(0, original.min_tokens - produced), "prompt_logprobs": None,
            "seed": None if original.seed is None else engine_derive_seed(original.seed, sample)}
    for f in FIELDS:                             # field by field, so a failure names the one dropped
        assert getattr(moved, f) == want[f], f"{surface}: {f} = {getattr(moved, f)!r}, expected {want[f]!r}"
    assert cont["input_ids"] == PROMPT + [1, 2, 3] and cont["request_id"] == "r.m1.2"
    # the produced tokens are declared earlier output of the sample (seeded noise, penalties continue)
    assert S.GenerateRequest.model_validate_json(json.dumps(cont)).prior_output_tokens == produced


def test_a_continuation_of_a_continuation_counts_every_earlier_token():
    """An original /generate that itself declared prior output: the moved one declares those too."""
    body = {"input_ids": [[1, 2, 3], [4, 5, 6, 7]], "prior_output_tokens": [1, 2],
            "sampling_params": {"temperature": 1.0, "sampling_seed": 5, "max_new_tokens": 8}}
    assert [prior_output_tokens("generate", body, i) for i in (0, 1)] == [1, 2]
    assert prior_output_tokens("generate", {**body, "prior_output_tokens": 3}, 1) == 3
    assert prior_output_tokens("generate", {"input_ids": [1]}, 0) == 0
    assert prior_output_tokens("completions", {"prompt": "x", "prior_output_tokens": 4}, 0) == 0
    state = sampling_state("generate", body, 1)
    cont = continuation_body(state, [4, 5, 6, 7, 9, 9, 9], 3, 0, "r.m1.0", prior=2)
    parsed = S.GenerateRequest.model_validate_json(json.dumps(cont))
    assert parsed.prior_output_tokens == 5 and _generate_params(cont).max_tokens == 5


def test_every_field_has_a_changed_value():
    assert set(CHANGED) == set(FIELDS)
    defaults = asdict(SamplingParams())
    assert all(CHANGED[f] != defaults[f] for f in FIELDS)


def test_per_prompt_sampling_params_of_a_batch():
    body = {"input_ids": [[1, 2], [3, 4]], "sampling_params": [{"temperature": 0.0, "max_new_tokens": 5},
                                                                {"temperature": 0.5, "sampling_seed": 9}]}
    assert sampling_state("generate", body, 0)["max_tokens"] == 5
    second = sampling_state("generate", body, 1)
    assert second["temperature"] == 0.5 and second["seed"] == 9 and second["max_tokens"] == 16


def test_derive_seed_matches_the_engine():
    for seed in (0, 1, 7, 2**62 + 5, 2**63 - 1):
        for i in range(5):
            assert derive_seed(seed, i) == engine_derive_seed(seed, i)
