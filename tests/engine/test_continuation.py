"""`prior_output_tokens`: a sample cut after k tokens and continued over prompt + those k tokens
(prior_output_tokens=k, max_tokens N-k) samples as the uncut request of N tokens would: seeded
noise keyed on the same steps, presence/frequency penalties counting the same tokens; through
preemption and a retract. Batch-invariant numerics make the comparison bitwise (docs/numerics.md)."""
from __future__ import annotations

import asyncio

import pytest

from tidal import SamplingParams
from tidal.engine.messages import EngineInvalidInput
from tests.engine.conftest import assert_no_leaks
from tests.engine.test_control import stream, wait_for

PROMPTS = [[5, 9, 17, 3], list(range(40, 52)), [7], [30, 30, 30, 30, 31]]
N = 14
CASES = {
    "seeded": dict(temperature=1.0, seed=7),
    "greedy_penalties": dict(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.7, repetition_penalty=1.2),
    "seeded_penalties": dict(temperature=0.9, top_k=30, seed=3, presence_penalty=0.6, frequency_penalty=1.2),
}


def _params(case: str, n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, **CASES[case], **kw)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def path(tiny_ckpt):
    return tiny_ckpt("llama")


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_a_continuation_samples_as_the_uncut_request(path, make_llm, case, overlap):
    llm = make_llm(path, batch_invariant=True, overlap_scheduling=overlap)
    full = _tokens(llm.generate(PROMPTS, _params(case, N), use_tqdm=False))
    assert all(len(f) == N for f in full)
    for k in (1, 6, N - 1):
        heads = [p + f[:k] for p, f in zip(PROMPTS, full)]
        outs = llm.generate(heads, _params(case, N - k), use_tqdm=False, prior_output_tokens=k)
        assert _tokens(outs) == [f[k:] for f in full], (case, k)
        if k == N - 1:  # the uncut run's KV of prompt + prefix is in the prefix cache: it serves these
            assert sum(o.num_cached_tokens for o in outs) > 0
        # what the request reports is its own: the prompt it was given, the tokens it made
        assert [o.prompt_token_ids for o in outs] == heads
        assert all(o.outputs[0].weight_spans[0].start == 0 and o.outputs[0].weight_spans[-1].end == N - k for o in outs)
    # one entry per prompt, mixed with an uncut request in the same batch
    ks = [2, 0, 5, 9]
    outs = llm.generate([p + f[:k] for p, f, k in zip(PROMPTS, full, ks)], [_params(case, N - k) for k in ks],
                        use_tqdm=False, prior_output_tokens=ks)
    assert _tokens(outs) == [f[k:] for f, k in zip(full, ks)]
    # without it the continuation is a fresh request over prompt + prefix: not the uncut one
    fresh = llm.generate([p + f[:6] for p, f in zip(PROMPTS, full)], _params(case, N - 6), use_tqdm=False)
    assert _tokens(fresh) != [f[6:] for f in full]
    assert_no_leaks(llm)


def test_min_tokens_and_max_tokens_count_the_requests_own_tokens(path, make_llm):
    llm = make_llm(path, batch_invariant=True)
    prompt = [5, 9, 17, 3]
    head = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    eos = head[-1]  # a stop id the continuation would sample at once unless min_tokens bans it
    out = llm.generate([prompt + head[:5]], SamplingParams(max_tokens=4, min_tokens=3, temperature=0.0,
                                                           stop_token_ids=[eos]),
                       use_tqdm=False, prior_output_tokens=5)[0].outputs[0]
    assert len(out.token_ids) >= 3 and len(out.token_ids) <= 4


def test_a_continuation_survives_preemption(path, make_llm):
    roomy = make_llm(path, batch_invariant=True)
    prompts = [[11 + i, 3, 4 + i, 9] for i in range(8)]
    n, k = 40, 7
    full = _tokens(roomy.generate(prompts, _params("seeded_penalties", n), use_tqdm=False))
    tight = make_llm(path, batch_invariant=True, num_kv_blocks=40, max_num_seqs=8)
    outs = tight.generate([p + f[:k] for p, f in zip(prompts, full)], _params("seeded_penalties", n - k),
                          use_tqdm=False, prior_output_tokens=k)
    assert tight.state()["num_preemptions"] > 0, "the small KV pool should have forced preemption"
    assert _tokens(outs) == [f[k:] for f in full]
    assert_no_leaks(tight)


async def test_a_continuation_survives_a_retract(path, make_engine):
    eng = make_engine(path, batch_invariant=True, max_num_seqs=4)
    n, k = 60, 5
    prompts = [[20 + i, 21, 22 + i] for i in range(4)]
    params = {case: _params(case, n) for case in ("seeded", "seeded_penalties")}
    cases = ["seeded", "seeded_penalties"] * 2
    ref_log: dict[str, list[int]] = {}
    full = await asyncio.gather(*(stream(eng, p, params[c], f"ref{i}", ref_log)
                                  for i, (p, c) in enumerate(zip(prompts, cases))))
    log: dict[str, list[int]] = {}

    async def cont(i: int) -> list[int]:
        seen = log.setdefault(f"c{i}", [])
        async for out in eng.generate(prompts[i] + full[i][0][:k], _params(cases[i], n - k), request_id=f"c{i}",
                                      delta=True, prior_output_tokens=k):
            seen.extend(out.outputs[0].token_ids)
        return seen

    tasks = [asyncio.create_task(cont(i)) for i in range(4)]
    await wait_for(lambda: all(len(log.get(f"c{i}", [])) > 3 for i in range(4)))
    res = await eng.pause("retract")
    assert len(res["retracted"]) == 4 and (await eng.state())["kv_blocks_used"] == 0
    await eng.resume()
    got = await asyncio.gather(*tasks)
    assert got == [f[0][k:] for f in full]


@pytest.mark.parametrize("value", [-1, 5, "2", 1.0, True, None])
def test_bad_prior_output_tokens_name_the_field(path, make_llm, value):
    llm = make_llm(path)
    with pytest.raises(EngineInvalidInput, match=r"prior_output_tokens=.* is invalid: expected an integer in \[0, 4\]"):
        llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=2), use_tqdm=False, prior_output_tokens=value)
    with pytest.raises(EngineInvalidInput, match=r"prior_output_tokens=.*one per prompt \(2\)"):
        llm.generate([[1, 2], [3]], SamplingParams(max_tokens=2), use_tqdm=False, prior_output_tokens=[1])
    with pytest.raises(EngineInvalidInput, match=r"prior_output_tokens=2 is invalid: expected an integer in \[0, 1\]"):
        llm.generate([[1, 2], [3]], SamplingParams(max_tokens=2), use_tqdm=False, prior_output_tokens=[2, 2])
    assert llm.state()["num_waiting"] == 0   # nothing was sent
    assert_no_leaks(llm)


async def test_bad_prior_output_tokens_through_async_llm(path, make_engine):
    eng = make_engine(path)
    with pytest.raises(EngineInvalidInput, match=r"prior_output_tokens=4 is invalid: expected an integer in \[0, 3\]"):
        async for _ in eng.generate([1, 2, 3], SamplingParams(max_tokens=2), prior_output_tokens=4):
            pass
