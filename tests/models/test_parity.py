"""Our models against HF transformers on the same tiny checkpoints: prefill a batch of
prompts of different lengths through the paged KV cache, then decode token by token."""
from __future__ import annotations

import pytest
import torch

from tidal.models import load_model
from tidal.kernels.fused import use_fused_kernels
from tests.helpers import LLAMA3_ROPE, YARN_ROPE, PagedRunner

ATOL = 1e-4
PROMPTS = [[7, 100, 3, 42, 250, 9, 18], [5], [200, 31, 64, 2, 77, 12, 90, 33, 150, 8, 61, 4, 255, 19]]


def hf_logits(path: str, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = _HF_CACHE.get(path)
    if model is None:
        model = _HF_CACHE[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


_HF_CACHE: dict[str, torch.nn.Module] = {}


def check_against_hf(path: str, decode_steps: int = 4, block_size: int = 4, fused: str = "auto") -> list[list[int]]:
    """Prefill PROMPTS together, decode greedily; compare every step's logits with HF's on the
    whole sequence so far. Returns the full token sequences. `fused`: EngineConfig.fused_kernels."""
    model = load_model(path, torch.float32, "cpu")
    use_fused_kernels(model, fused, torch.device("cpu"))
    runner = PagedRunner(model, len(PROMPTS), max_len=64, block_size=block_size)
    seqs = [list(p) for p in PROMPTS]
    logits = runner.step(PROMPTS)
    for step in range(decode_steps + 1):
        for seq, ours in zip(seqs, logits):
            ref = hf_logits(path, seq)[-ours.shape[0]:]
            torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0, msg=lambda m: f"step {step}: {m}")
        if step == decode_steps:
            break
        nxt = [[int(l[-1].argmax())] for l in logits]
        for seq, t in zip(seqs, nxt):
            seq += t
        logits = runner.step(nxt)
    return seqs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_prefill_and_decode_match_hf(tiny_ckpt, arch):
    seqs = check_against_hf(tiny_ckpt(arch))
    continuations = [tuple(s[len(p):]) for s, p in zip(seqs, PROMPTS)]
    assert len(set(continuations)) > 1, f"greedy output is degenerate: {continuations}"


def test_chunked_prefill_mixed_with_decode_matches_hf(tiny_ckpt):
    path = tiny_ckpt("qwen3")
    model = load_model(path, torch.float32, "cpu")
    runner = PagedRunner(model, 2, max_len=64, block_size=4)
    a, b = PROMPTS[2], PROMPTS[0]
    runner.step([a[:5], b])                     # a: first chunk; b: whole prompt
    out_a, out_b = runner.step([a[5:], [11]])   # a: rest of the prompt; b: one decode token
    torch.testing.assert_close(out_a, hf_logits(path, a)[5:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out_b, hf_logits(path, b + [11])[-1:], atol=ATOL, rtol=0)


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    # original_max_position_embeddings small enough that all three frequency bands occur at head_dim 16.
    "llama3": LLAMA3_ROPE,
    "yarn": YARN_ROPE,
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                    "rope_theta": 10000.0, "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
}


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_matches_hf(tiny_ckpt, variant):
    check_against_hf(tiny_ckpt("llama", rope_parameters=dict(ROPE_VARIANTS[variant])), decode_steps=2)


def test_qwen3_yarn_matches_hf(tiny_ckpt):
    check_against_hf(tiny_ckpt("qwen3", rope_parameters=dict(ROPE_VARIANTS["yarn"])), decode_steps=1)


def test_bf16_forward_runs_and_tracks_float32(tiny_ckpt):
    path = tiny_ckpt("qwen2")
    ref = PagedRunner(load_model(path, torch.float32, "cpu"), 1, 32).step([PROMPTS[2]])[0]
    model = load_model(path, torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = PagedRunner(model, 1, 32).step([PROMPTS[2]])[0]
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1


def test_llama_with_attention_and_mlp_bias_matches_hf(tiny_ckpt):
    path = tiny_ckpt("llama", attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    model = load_model(path, torch.float32, "cpu")
    assert {"model.layers.0.self_attn.o_proj.bias", "model.layers.0.mlp.up_proj.bias"} <= set(model.weight_specs())
    check_against_hf(path, decode_steps=1)
