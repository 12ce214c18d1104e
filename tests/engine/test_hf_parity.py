"""Greedy generation equals HF transformers' `generate`, token for token, and logprobs match
HF's log-softmax, under every scheduling path: prefix caching on/off, chunked prefill, preemption."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tidal import SamplingParams
from tests.engine.conftest import assert_no_leaks

MAX_TOKENS = 16
SHARED = list(range(40, 58))  # a shared 18-token prefix, so the prefix cache gets hits


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lens = [3, 9, 17, 30, 5, 24]
    prompts = [torch.randint(0, 250, (n,), generator=g).tolist() for n in lens]
    prompts += [SHARED + [7, 8], SHARED + [9], SHARED + [10, 11, 12, 13, 14]]
    return prompts


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def reference(request, tiny_ckpt):
    path = tiny_ckpt(request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for p in _prompts():
            ids = torch.tensor([p])
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                              do_sample=False)
            outs.append(gen[0, len(p):].tolist())
    return path, hf, outs


def _hf_logprobs(hf, prompt: list[int], output: list[int]) -> list[float]:
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = hf(ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(output)]


SCENARIOS = {
    "prefix_cache_on": dict(enable_prefix_caching=True),
    "prefix_cache_off": dict(enable_prefix_caching=False),
    "chunked_prefill": dict(max_num_batched_tokens=8),
    "preemption": dict(num_kv_blocks=16, max_num_seqs=8),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_matches_hf(reference, scenario, make_llm):
    path, hf, expected = reference
    llm = make_llm(path, **SCENARIOS[scenario])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0)
    prompts = _prompts()
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, out, exp in zip(prompts, outs, expected):
        c = out.outputs[0]
        assert c.token_ids == exp, f"prompt len {len(p)}"
        assert c.finish_reason == ("stop" if len(exp) < MAX_TOKENS else "length")
        ref = _hf_logprobs(hf, p, c.token_ids)
        assert max(abs(a - b) for a, b in zip(c.token_logprobs, ref)) < 1e-4
    st = llm.state()
    if scenario == "preemption":
        assert st["num_preemptions"] > 0, "the tiny KV pool should have forced preemption"
    if scenario == "prefix_cache_on":
        # Run again: now the prompts' full blocks come from the cache; outputs must not change.
        again = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected
        assert llm.state()["prefix_cache_hit_tokens"] > 0
    assert_no_leaks(llm)
