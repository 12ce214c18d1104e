"""The fused Triton kernels of tidal.kernels.fused against the torch ops they replace.

Without a GPU they run in Triton's interpreter on the CPU (tests/conftest.py sets it up); the
whole-model test forces them on for a forward pass and checks the logits against HF.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tidal.kernels import fused
from tidal.kernels.fused import add_rms_norm, qk_norm_rope, silu_mul, use_fused_kernels
from tidal.models.layers import RMSNorm, RopeInputs, RotaryEmbedding, apply_rope
from tidal.models.config import RopeConfig

pytestmark = pytest.mark.skipif(fused.triton is None, reason="Triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# One bf16 rounding apart at most (the fused kernels round once where torch rounds twice).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def randn(*shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_module(dtype, with_residual):
    norm = RMSNorm(96, 1e-6, dtype).to(DEVICE)
    norm.weight.copy_(randn(96, dtype=dtype, seed=1))
    # x as a strided view (rows of a wider buffer), as a projection's slice would be.
    x = randn(5, 128, dtype=dtype)[:, :96]
    res = randn(5, 96, dtype=dtype, seed=2) if with_residual else None
    out, res_out = add_rms_norm(x, res, norm.weight, 1e-6)
    if with_residual:
        ref, ref_res = norm(x, res)
        # Exact in float32; in bf16 within one rounding (the interpreter's cast truncates).
        torch.testing.assert_close(res_out, ref_res, atol=0, rtol=0 if dtype == torch.float32 else 1e-2)
    else:
        ref = norm(x)
        assert res_out is None
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype):
    gate_up = randn(3, 2 * 1100, dtype=dtype)  # 1100: more than one 1024-wide block, not a power of two
    gate, up = gate_up.split(1100, dim=-1)
    torch.testing.assert_close(silu_mul(gate_up), F.silu(gate) * up, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,with_norm", [((4, 2), True), ((6, 2), False), ((3, 1), True)])
def test_qk_norm_rope_matches_torch_ops(dtype, heads, with_norm):
    hq, hkv = heads
    d, tokens = 32, 7
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), d, 64).to(DEVICE)
    positions = torch.tensor([0, 1, 5, 63, 17, 2, 40], device=DEVICE)
    qkv = randn(tokens, (hq + 2 * hkv) * d, dtype=dtype)
    q_norm = k_norm = None
    if with_norm:
        q_norm, k_norm = RMSNorm(d, 1e-6, dtype).to(DEVICE), RMSNorm(d, 1e-6, dtype).to(DEVICE)
        q_norm.weight.copy_(randn(d, dtype=dtype, seed=3))
        k_norm.weight.copy_(randn(d, dtype=dtype, seed=4))

    qk = qkv[:, :(hq + hkv) * d].view(tokens, hq + hkv, d)
    if with_norm:
        qk = torch.cat([q_norm(qk[:, :hq]), k_norm(qk[:, hq:])], dim=1)
    ref = apply_rope(qk, *RopeInputs(positions, rope.cos_sin).cos_sin())

    out = qk_norm_rope(qkv, hq, hkv, d, positions, rope.cos_sin, q_norm.weight if with_norm else None,
                       k_norm.weight if with_norm else None, 1e-6)
    assert out.shape == (tokens, hq + hkv, d) and out.is_contiguous()
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="fused_kernels='yes'"):
        use_fused_kernels(torch.nn.Linear(2, 2), "yes", torch.device("cpu"))
    with pytest.raises(ValueError, match="q_weight and k_weight"):
        qk_norm_rope(torch.zeros(1, 64), 1, 1, 16, torch.zeros(1, dtype=torch.int64), torch.zeros(4, 16),
                     torch.ones(16), None, 1e-6)
    with pytest.raises(ValueError, match="cos_sin"):
        qk_norm_rope(torch.zeros(1, 64), 1, 1, 16, torch.zeros(1, dtype=torch.int64),
                     torch.zeros(4, 16, dtype=torch.float64), None, None, 1e-6)
    with pytest.raises(ValueError, match="residual.shape"):
        add_rms_norm(torch.zeros(2, 8), torch.zeros(2, 4), torch.ones(8), 1e-6)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU forward through the interpreter; on a GPU the engine tests cover the fused path")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_model_with_fused_kernels_matches_hf(tiny_ckpt, arch):
    from tests.models.test_parity import check_against_hf

    calls = {"n": 0}
    kernel = fused._qk_norm_rope_kernel
    try:
        # Count launches, so the test fails if the model stopped taking the fused path.
        class Counting:
            def __getitem__(self, grid):
                calls["n"] += 1
                return kernel[grid]
        fused._qk_norm_rope_kernel = Counting()
        check_against_hf(tiny_ckpt(arch), decode_steps=2, fused="on")
    finally:
        fused._qk_norm_rope_kernel = kernel
    assert calls["n"] > 0
