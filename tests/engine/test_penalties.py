"""Repetition / presence / frequency penalties with vLLM's semantics: the sampler's tensor ops
against a per-token reference, and greedy decoding end to end against a loop over HF logits."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tidal import SamplingParams
from tidal.runner.sampler import PenaltyTensors, apply_penalties
from tests.engine.conftest import assert_no_leaks


def _reference(logits: list[float], prompt: list[int], output: list[int], rep: float, pres: float,
               freq: float) -> list[float]:
    """One row, token by token: repetition over prompt + output (positive logits divided,
    others multiplied), then frequency * count and presence once, over the output only."""
    out = list(logits)
    for tok in set(prompt) | set(output):
        out[tok] = out[tok] / rep if out[tok] > 0 else out[tok] * rep
    for tok in set(output):
        out[tok] -= freq * output.count(tok) + pres
    return out


def test_apply_penalties_matches_the_reference():
    g = torch.Generator().manual_seed(0)
    vocab = 40
    rows = [  # (prompt, output, repetition, presence, frequency)
        ([1, 2, 3, 3], [4, 4, 4, 5, 1], 1.3, 0.5, 0.25),
        ([7], [], 0.7, 0.0, 0.0),
        ([], [9, 9, 10], 1.0, -0.5, 1.5),
        ([11, 12], [12, 13], 1.0, 0.0, 0.0),  # no penalty: unchanged
        ([0, 39], [39, 39, 0], 2.0, 2.0, -2.0),
    ]
    logits = torch.randn(len(rows), vocab, generator=g) * 3
    p = PenaltyTensors(
        repetition=torch.tensor([r[2] for r in rows]), presence=torch.tensor([r[3] for r in rows]),
        frequency=torch.tensor([r[4] for r in rows]),
        prompt_rows=torch.tensor([i for i, r in enumerate(rows) for _ in r[0]], dtype=torch.int64),
        prompt_ids=torch.tensor([t for r in rows for t in r[0]], dtype=torch.int64),
        output_rows=torch.tensor([i for i, r in enumerate(rows) for _ in r[1]], dtype=torch.int64),
        output_ids=torch.tensor([t for r in rows for t in r[1]], dtype=torch.int64))
    got = apply_penalties(logits, p)
    for i, (prompt, output, rep, pres, freq) in enumerate(rows):
        ref = _reference(logits[i].tolist(), prompt, output, rep, pres, freq)
        assert got[i].tolist() == pytest.approx(ref, abs=1e-5)
    assert torch.equal(got[3], logits[3])


def _hf_greedy(hf, prompt: list[int], n: int, rep: float, pres: float, freq: float) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float().tolist()
            pen = _reference(logits, prompt, out, rep, pres, freq)
            out.append(max(range(len(pen)), key=pen.__getitem__))
    return out


CASES = [dict(repetition_penalty=1.5), dict(presence_penalty=1.0, frequency_penalty=0.5),
         dict(repetition_penalty=0.8, frequency_penalty=-0.3)]


@pytest.fixture(scope="module")
def hf_llama(tiny_ckpt):
    path = tiny_ckpt("llama")
    return path, AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("overlap", [True, False])
def test_greedy_with_penalties_matches_a_reference_loop(hf_llama, overlap, make_llm):
    path, hf = hf_llama
    llm = make_llm(path, overlap_scheduling=overlap)
    prompts = [[52, 52, 52, 10], list(range(60, 75)), [3]]
    base = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, base, use_tqdm=False)]
    for case in CASES:
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, **case)
        # Mixed with unpenalized rows: the penalties touch only their own rows.
        outs = llm.generate(prompts + prompts, [params] * 3 + [base] * 3, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        assert got[3:] == plain
        assert got[:3] != plain, f"{case} should change some greedy output"
        rep = case.get("repetition_penalty", 1.0)
        pres, freq = case.get("presence_penalty", 0.0), case.get("frequency_penalty", 0.0)
        for prompt, tokens in zip(prompts, got[:3]):
            assert tokens == _hf_greedy(hf, prompt, 10, rep, pres, freq), (case, prompt)
    assert_no_leaks(llm)


def test_processed_logprobs_include_penalties_raw_ones_do_not(hf_llama, make_llm):
    path, hf = hf_llama
    llm = make_llm(path)
    prompt = [52, 52, 52, 10]
    kw = dict(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=0, repetition_penalty=1.5,
              presence_penalty=0.5)
    raw, proc = (o.outputs[0] for o in llm.generate(
        [prompt, prompt], [SamplingParams(**kw, logprobs_mode="raw"), SamplingParams(**kw, logprobs_mode="processed")],
        use_tqdm=False))
    assert raw.token_ids == proc.token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + raw.token_ids])).logits[0].float()
    for i, tok in enumerate(raw.token_ids):
        row = logits[len(prompt) - 1 + i]
        assert math.isclose(raw.token_logprobs[i], torch.log_softmax(row, -1)[tok].item(), abs_tol=1e-4)
        pen = torch.tensor(_reference(row.tolist(), prompt, raw.token_ids[:i], 1.5, 0.5, 0.0))
        assert math.isclose(proc.token_logprobs[i], torch.log_softmax(pen, -1)[tok].item(), abs_tol=1e-4)


def test_seeded_sampling_with_penalties_is_reproducible(tiny_ckpt, make_llm):
    llm = make_llm(tiny_ckpt("qwen2"))
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=5, frequency_penalty=1.0, ignore_eos=True)
    alone = llm.generate(["abc"], params, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(["x", "abc", "yz"], [SamplingParams(max_tokens=4), params, SamplingParams(max_tokens=9)],
                         use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone


@pytest.mark.parametrize("kwargs,field", [
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"), (dict(presence_penalty="1"), "presence_penalty"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
])
def test_bad_penalties_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}="):
        SamplingParams(**kwargs)
