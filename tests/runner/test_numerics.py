"""Logprob modes (raw / processed) and the fp32 LM head (docs/numerics.md)."""
from __future__ import annotations

import math

import pytest
import torch

from tests.runner.test_sampler import kept_probs, sample
from tidal import LLM, SamplingParams as SP
from tidal.config import EngineConfig
from tidal.models.loader import load_model
from tidal.runner.sampler import Sampler, SamplingTensors, apply_token_bans

COMBOS = [
    SP(temperature=0.7), SP(temperature=1.3, top_k=5), SP(temperature=1.0, top_p=0.6),
    SP(temperature=0.8, min_p=0.1), SP(temperature=1.2, top_k=30, top_p=0.9),
    SP(temperature=0.5, top_k=12, min_p=0.05), SP(temperature=1.0, top_p=0.8, min_p=0.02),
    SP(temperature=0.9, top_k=40, top_p=0.95, min_p=0.01), SP(temperature=1.0, top_k=1),
]


def _processed(p: SP, k: int = 3) -> SP:
    return SP(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, logprobs=k,
              logprobs_mode="processed")


@pytest.mark.parametrize("p", COMBOS, ids=lambda p: f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_processed_logprobs_are_the_sampling_distributions(p):
    torch.manual_seed(3)
    logits = torch.randn(24, 300) * 3
    q = _processed(p)
    out = sample(logits, [q] * 24)
    for row in range(24):
        ref = kept_probs(logits[row], p)  # float64, computed independently of the sampler
        tok = out.token_ids[row].item()
        assert tok in ref
        assert abs(out.logprobs[row].item() - math.log(ref[tok])) < 1e-5
        best = sorted(ref.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        for j, (tid, prob) in enumerate(best):
            assert out.top_token_ids[row, j].item() == tid
            assert abs(out.top_logprobs[row, j].item() - math.log(prob)) < 1e-5
        for j in range(len(best), 3):  # fewer than 3 tokens kept: the rest have probability 0
            assert out.top_logprobs[row, j].item() == -math.inf


def test_raw_and_processed_rows_mix_in_one_batch_and_greedy_processed_is_raw():
    torch.manual_seed(4)
    logits = torch.randn(4, 200) * 3
    p = SP(temperature=0.8, top_k=10, logprobs=0)
    rows = [p, _processed(p, 0), SP(temperature=0, logprobs=0, logprobs_mode="processed"), SP(temperature=0, logprobs=0)]
    out = sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1).gather(1, out.token_ids[:, None]).squeeze(1)
    assert out.logprobs[0].item() == pytest.approx(raw[0].item(), abs=1e-6)
    ref = kept_probs(logits[1], p)
    assert out.logprobs[1].item() == pytest.approx(math.log(ref[out.token_ids[1].item()]), abs=1e-5)
    assert out.logprobs[1] > raw[1]  # renormalised over the 10 kept tokens
    assert out.logprobs[2].item() == pytest.approx(raw[2].item(), abs=1e-6)
    assert out.logprobs[3].item() == pytest.approx(raw[3].item(), abs=1e-6)


def test_engine_default_mode_applies_to_requests_without_one():
    logits = torch.randn(2, 50) * 3
    params = [SP(temperature=1.0, top_k=1, logprobs=0), SP(temperature=1.0, top_k=1, logprobs=0, logprobs_mode="raw")]
    t = SamplingTensors.build(params, [1, 2], [0, 0], "cpu", logprobs_mode="processed")
    out = Sampler()(logits, t)
    assert out.logprobs[0].item() == 0.0  # top_k=1: the one kept token has probability 1
    assert out.logprobs[1].item() < 0.0


def test_processed_logprobs_include_token_bans_and_raw_ones_do_not():
    torch.manual_seed(5)
    raw = torch.randn(2, 40) * 3
    banned = raw.clone()
    apply_token_bans(banned, torch.tensor([0, 1]), torch.tensor([3, 3]))
    params = [SP(temperature=0, logprobs=0, logprobs_mode="processed"), SP(temperature=0, logprobs=0)]
    t = SamplingTensors.build(params, [1, 2], [0, 0], "cpu")
    out = Sampler()(banned, t, raw_logits=raw)
    tok = out.token_ids
    assert torch.allclose(out.logprobs[0], torch.log_softmax(banned[0], -1)[tok[0]])
    assert torch.allclose(out.logprobs[1], torch.log_softmax(raw[1], -1)[tok[1]])


def test_invalid_modes_name_the_field():
    with pytest.raises(ValueError, match="SamplingParams.logprobs_mode='sampled'"):
        SP(logprobs_mode="sampled")
    with pytest.raises(ValueError, match="EngineConfig.logprobs_mode='x'"):
        EngineConfig(logprobs_mode="x", device="cpu")
    with pytest.raises(ValueError, match="EngineConfig.lm_head_dtype='bfloat16'"):
        EngineConfig(lm_head_dtype="bfloat16", device="cpu")
    with pytest.raises(ValueError, match="EngineConfig.batch_invariant=1"):
        EngineConfig(batch_invariant=1, device="cpu")


def test_http_schemas_take_the_same_mode_names():
    from pydantic import ValidationError

    from tidal.server import schemas as S
    assert S.GenerateSamplingParams(logprobs_mode="processed").logprobs_mode == "processed"
    assert S.CompletionRequest(prompt="a", logprobs_mode="raw").logprobs_mode == "raw"
    assert S.ChatCompletionRequest(messages=[{"role": "user", "content": "a"}]).logprobs_mode is None
    with pytest.raises(ValidationError, match="logprobs_mode"):
        S.GenerateSamplingParams(logprobs_mode="sampled")


def test_engine_reports_processed_logprobs(tiny_ckpt):
    llm = LLM(tiny_ckpt("llama"), dtype="float32", device="cpu", num_kv_blocks=256, logprobs_mode="processed")
    try:
        reqs = [SP(max_tokens=5, temperature=1.0, top_k=1, seed=1, logprobs=0, ignore_eos=True),
                SP(max_tokens=5, temperature=1.0, top_k=1, seed=1, logprobs=0, ignore_eos=True, logprobs_mode="raw")]
        proc, raw = (o.outputs[0] for o in llm.generate(["abc", "abc"], reqs, use_tqdm=False))
        assert proc.token_ids == raw.token_ids
        assert proc.token_logprobs == [0.0] * 5
        assert all(lp < 0.0 for lp in raw.token_logprobs)
    finally:
        llm.shutdown()


# --- fp32 LM head ------------------------------------------------------------------------------

def test_fp32_lm_head_is_closer_to_the_fp32_reference(tiny_ckpt):
    model = load_model(tiny_ckpt("qwen2"), torch.bfloat16, "cpu")
    torch.manual_seed(0)
    hidden = (torch.randn(64, model.arch.hidden_size) * 2).bfloat16()
    ref = torch.log_softmax(hidden.double() @ model.lm_head.weight.double().T, dim=-1)
    bf16 = torch.log_softmax(model.compute_logits(hidden), dim=-1)
    model.lm_head_dtype = torch.float32
    fp32 = torch.log_softmax(model.compute_logits(hidden), dim=-1)
    err_bf16 = (bf16.double() - ref).abs().max().item()
    err_fp32 = (fp32.double() - ref).abs().max().item()
    assert err_fp32 < 1e-5 and err_fp32 * 100 < err_bf16, (err_fp32, err_bf16)


def test_fp32_lm_head_follows_in_place_weight_updates(tiny_ckpt):
    model = load_model(tiny_ckpt("llama"), torch.bfloat16, "cpu")
    model.lm_head_dtype = torch.float32
    hidden = torch.randn(3, model.arch.hidden_size).bfloat16()
    before = model.compute_logits(hidden)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)  # as update_weights' copy_ does: same storage, new version
    after = model.compute_logits(hidden)
    assert torch.allclose(after, 2 * before, rtol=1e-5, atol=1e-5)


def test_engine_runs_a_bf16_model_with_the_fp32_head(tiny_ckpt):
    path = tiny_ckpt("llama")
    outs = {}
    for head in (None, "float32"):
        llm = LLM(path, dtype="bfloat16", device="cpu", num_kv_blocks=256, lm_head_dtype=head)
        try:
            outs[head] = llm.generate(["hello"], SP(max_tokens=4, temperature=0, logprobs=0, ignore_eos=True),
                                      use_tqdm=False)[0].outputs[0]
        finally:
            llm.shutdown()
    assert outs[None].token_logprobs != outs["float32"].token_logprobs  # the head really changed
    assert all(abs(a - b) < 0.1 for a, b in zip(outs[None].token_logprobs, outs["float32"].token_logprobs))


def test_sleep_frees_the_fp32_head_copy_and_wake_restores_the_outputs(tiny_ckpt):
    llm = LLM(tiny_ckpt("llama"), dtype="bfloat16", device="cpu", num_kv_blocks=256, lm_head_dtype="float32")
    try:
        params = SP(max_tokens=4, temperature=0, logprobs=0, ignore_eos=True)
        before = llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0]
        head = llm.engine.core.runner.model.lm_head
        assert head._fp32 is not None
        llm.pause()
        llm.sleep(["weights"])
        assert head._fp32 is None
        llm.wake_up(["weights"])
        llm.resume()
        after = llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0]
        assert (after.token_ids, after.token_logprobs) == (before.token_ids, before.token_logprobs)
    finally:
        llm.shutdown()
