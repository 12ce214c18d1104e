"""Prompt logprobs (SamplingParams.prompt_logprobs): every prompt token's logprob given its prefix,
equal to HF transformers' log-softmax in fp32, whatever the scheduling (chunked prefill,
preemption, a cached prefix), with and without generation (max_tokens=0 scoring)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tidal import SamplingParams
from tidal.outputs import Logprob
from tests.engine.conftest import assert_no_leaks

SHARED = list(range(40, 62))  # 22 tokens: 5 full blocks of 4, so a later prompt gets cache hits


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 250, (n,), generator=g).tolist() for n in (1, 2, 7, 19, 33)]
    return prompts + [SHARED + [5, 6, 7]]


def _hf_reference(hf, prompt: list[int], k: int) -> tuple[list[float], list[int], list[dict[int, float]]]:
    """Per prompt token 1..: HF's logprob of it given its prefix, its rank, the top-k."""
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    lps, ranks, tops = [], [], []
    for pos, tok in enumerate(prompt[1:]):
        row = lp[pos]
        lps.append(row[tok].item())
        ranks.append(int((row > row[tok]).sum()) + 1)
        vals, ids = row.topk(k)
        tops.append(dict(zip(ids.tolist(), vals.tolist())))
    return lps, ranks, tops


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def reference(request, tiny_ckpt):
    path = tiny_ckpt(request.param)
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    return path, [_hf_reference(hf, p, 3) for p in _prompts()]


def _assert_matches(out, ref, tol: float = 1e-4) -> None:
    lps, ranks, tops = ref
    assert out.prompt_token_logprobs[0] is None and len(out.prompt_token_logprobs) == len(out.prompt_token_ids)
    got = out.prompt_token_logprobs[1:]
    assert max((abs(a - b) for a, b in zip(got, lps)), default=0.0) < tol
    assert out.prompt_token_ranks[1:] == ranks
    for mine, theirs in zip(out.prompt_top_logprobs[1:], tops):
        assert list(mine) == list(theirs)
        assert max(abs(mine[t] - theirs[t]) for t in theirs) < tol


SCENARIOS = {
    "default": dict(),
    "chunked_prefill": dict(max_num_batched_tokens=5),
    "no_overlap": dict(overlap_scheduling=False, max_num_batched_tokens=6),
    "preemption": dict(num_kv_blocks=14, max_num_seqs=6),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_prompt_logprobs_match_hf(reference, scenario, make_llm):
    path, refs = reference
    llm = make_llm(path, **SCENARIOS[scenario])
    max_tokens = 16 if scenario == "preemption" else 4  # long enough outputs to outgrow the pool
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, prompt_logprobs=3, ignore_eos=True)
    outs = llm.generate(_prompts(), params, use_tqdm=False)
    for out, ref in zip(outs, refs):
        _assert_matches(out, ref)
        assert len(out.outputs[0].token_ids) == max_tokens
    if scenario == "preemption":
        assert llm.state()["num_preemptions"] > 0, "the tiny KV pool should have forced preemption"
    assert_no_leaks(llm)


def test_chunked_prefill_gives_the_same_values(tiny_ckpt, make_llm):
    path = tiny_ckpt("llama")
    prompt = list(range(3, 60))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
    whole = make_llm(path).generate([prompt], params, use_tqdm=False)[0]
    chunked_llm = make_llm(path, max_num_batched_tokens=4)
    # Alongside other requests, so the chunks share steps with decodes.
    outs = chunked_llm.generate([[7, 8], prompt, [9] * 11], [SamplingParams(max_tokens=6), params,
                                                            SamplingParams(max_tokens=3)], use_tqdm=False)
    chunked = outs[1]
    assert len(chunked.prompt_token_logprobs) == len(prompt)
    assert max(abs(a - b) for a, b in zip(whole.prompt_token_logprobs[1:], chunked.prompt_token_logprobs[1:])) < 1e-5
    assert chunked.prompt_token_ranks == whole.prompt_token_ranks
    assert [list(t) for t in chunked.prompt_top_logprobs[1:]] == [list(t) for t in whole.prompt_top_logprobs[1:]]
    assert_no_leaks(chunked_llm)


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs(tiny_ckpt, make_llm):
    path = tiny_ckpt("qwen3")
    llm = make_llm(path)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    prompt = SHARED + [9, 10, 11]
    cold = llm.generate([prompt], params, use_tqdm=False)[0]
    # Put the shared prefix in the cache with a plain request; it reports the hit.
    warm_plain = llm.generate([SHARED + [1, 2]], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert warm_plain.num_cached_tokens == 20
    warm = llm.generate([prompt], params, use_tqdm=False)[0]
    assert warm.num_cached_tokens == 0, "prompt-logprob requests skip the prefix cache (documented)"
    assert warm.prompt_token_logprobs == cold.prompt_token_logprobs
    assert warm.prompt_top_logprobs == cold.prompt_top_logprobs
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert_no_leaks(llm)


@pytest.mark.parametrize("overlap", [True, False])
def test_max_tokens_zero_scores_the_prompt_only(reference, overlap, make_llm):
    path, refs = reference
    llm = make_llm(path, overlap_scheduling=overlap, max_num_batched_tokens=7)
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=0, prompt_logprobs=3), use_tqdm=False)
    for out, ref in zip(outs, refs):
        c = out.outputs[0]
        assert c.token_ids == [] and c.text == "" and c.finish_reason == "length" and c.finished()
        _assert_matches(out, ref)
    assert_no_leaks(llm)


def test_scoring_next_to_generation_changes_neither(tiny_ckpt, make_llm):
    path = tiny_ckpt("llama")
    llm = make_llm(path, max_num_batched_tokens=6)
    gen = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
    alone = llm.generate([[1, 2, 3], [4, 5, 6, 7]], gen, use_tqdm=False)
    score = SamplingParams(max_tokens=0, prompt_logprobs=0)
    scored_alone = llm.generate([list(range(20, 40))], score, use_tqdm=False)[0]
    mixed = llm.generate([[1, 2, 3], list(range(20, 40)), [4, 5, 6, 7]], [gen, score, gen], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in (mixed[0], mixed[2])] == [o.outputs[0].token_ids for o in alone]
    assert mixed[1].outputs[0].token_ids == [] and mixed[1].prompt_top_logprobs is None
    assert max(abs(a - b) for a, b in zip(mixed[1].prompt_token_logprobs[1:],
                                          scored_alone.prompt_token_logprobs[1:])) < 1e-5
    assert_no_leaks(llm)


def test_vllm_shaped_prompt_logprobs(tiny_ckpt, make_llm):
    llm = make_llm(tiny_ckpt("llama"))
    out = llm.generate(["hello there"], SamplingParams(max_tokens=0, prompt_logprobs=2), use_tqdm=False)[0]
    shaped = out.prompt_logprobs
    assert shaped[0] is None and len(shaped) == len(out.prompt_token_ids)
    tok = llm.get_tokenizer()
    for pos, entry in enumerate(shaped[1:], start=1):
        token = out.prompt_token_ids[pos]
        first = next(iter(entry))
        assert first == token and isinstance(entry[token], Logprob)
        assert entry[token].logprob == out.prompt_token_logprobs[pos]
        assert entry[token].rank == out.prompt_token_ranks[pos]
        assert entry[token].decoded_token == tok.decode([token])
        top = out.prompt_top_logprobs[pos]
        for rank, alt in enumerate(top, start=1):
            assert entry[alt].logprob == top[alt]
            assert entry[alt].rank == (out.prompt_token_ranks[pos] if alt == token else rank)
    # Without prompt logprobs the fields stay None.
    plain = llm.generate(["hello"], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None and plain.prompt_token_logprobs is None


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_bad_prompt_logprobs_name_the_field(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)


def test_max_tokens_zero_with_n_samples_is_refused():
    with pytest.raises(ValueError, match=r"SamplingParams\.n=2"):
        SamplingParams(max_tokens=0, n=2, prompt_logprobs=0)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=0, min_tokens=1)


async def test_streamed_deltas_carry_prompt_logprobs_once(tiny_ckpt, make_engine, make_llm):
    path = tiny_ckpt("llama")
    prompt = list(range(5, 30))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    offline = make_llm(path, max_num_batched_tokens=8).generate([prompt], params, use_tqdm=False)[0]
    eng = make_engine(path, max_num_batched_tokens=8)
    deltas = [out async for out in eng.generate(prompt, params, delta=True)]
    carrying = [d for d in deltas if d.prompt_token_logprobs is not None]
    assert len(carrying) == 1 and carrying[0] is deltas[0]
    assert carrying[0].prompt_token_logprobs == offline.prompt_token_logprobs
    assert carrying[0].prompt_top_logprobs == offline.prompt_top_logprobs
    cumulative = [out async for out in eng.generate(prompt, params)]
    assert all(o.prompt_token_logprobs == offline.prompt_token_logprobs for o in cumulative)
