"""The C row kernels of tidal.kernels.cpu_native (the CPU's fused ops) against the torch ops they
replace, and the model taking them by default on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tidal.kernels import cpu_native
from tidal.kernels.fused import use_fused_kernels
from tidal.models.config import RopeConfig
from tidal.models.layers import RMSNorm, RopeInputs, RotaryEmbedding, apply_rope

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def ops():
    kernels = cpu_native.row_kernels()
    if kernels is None:
        pytest.skip("no C compiler here (or TIDAL_CPU_NATIVE=0): the torch ops run")
    return kernels


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("width", [96, 1000])
def test_add_rms_norm_matches_module(ops, with_residual, width):
    norm = RMSNorm(width, 1e-6, torch.float32)
    norm.weight.data.copy_(randn(width, seed=1))
    x = randn(5, width + 32)[:, :width]  # rows of a wider buffer, as a projection's slice is
    res = randn(5, width, seed=2) if with_residual else None
    out, res_out = ops.add_rms_norm(x, res, norm.weight, 1e-6)
    if with_residual:
        ref, ref_res = norm(x, res)
        assert torch.equal(res_out, ref_res)
    else:
        ref, _ = norm(x), None
        assert res_out is None
    assert torch.equal(out, ref)  # the torch ops' bits: near-tied greedy tokens turn on them


@pytest.mark.parametrize("inter", [16, 1100, 7])
def test_silu_mul_matches_torch(ops, inter):
    gate_up = randn(3, 2 * inter) * 8  # large |gate| on both sides: exp's clamps
    gate_up[0, :2] = torch.tensor([-200.0, 200.0])
    gate, up = gate_up.split(inter, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, **TOL)


@pytest.mark.parametrize("heads,with_norm,d", [((4, 2), True, 32), ((6, 2), False, 64), ((3, 1), True, 128)])
def test_qk_norm_rope_matches_torch_ops(ops, heads, with_norm, d):
    hq, hkv = heads
    tokens = 7
    rope = RotaryEmbedding(RopeConfig(theta=10000.0), d, 64)
    positions = torch.tensor([0, 1, 5, 63, 17, 2, 40])
    qkv = randn(tokens, (hq + 2 * hkv) * d)
    q_norm = k_norm = None
    qk = qkv[:, : (hq + hkv) * d].view(tokens, hq + hkv, d)
    if with_norm:
        q_norm, k_norm = RMSNorm(d, 1e-6, torch.float32), RMSNorm(d, 1e-6, torch.float32)
        q_norm.weight.data.copy_(randn(d, seed=3))
        k_norm.weight.data.copy_(randn(d, seed=4))
        qk = torch.cat([q_norm(qk[:, :hq]), k_norm(qk[:, hq:])], dim=1)
    ref = apply_rope(qk, *RopeInputs(positions, rope.cos_sin).cos_sin())
    out = ops.qk_norm_rope(
        qkv,
        hq,
        hkv,
        d,
        positions,
        rope.cos_sin,
        q_norm.weight if with_norm else None,
        k_norm.weight if with_norm else None,
        1e-6,
    )
    assert out.shape == (tokens, hq + hkv, d) and out.is_contiguous()
    torch.testing.assert_close(out, ref, **TOL)


def test_row_kernels_refuse_what_they_cannot_take(ops):
    with pytest.raises(ValueError, match="expected a 2-D float32 CPU tensor"):
        ops.silu_mul(torch.zeros(2, 8, dtype=torch.bfloat16))
    pos = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="head_dim=15"):
        ops.qk_norm_rope(torch.zeros(1, 45), 1, 1, 15, pos, torch.zeros(4, 15), None, None, 1e-6)
    with pytest.raises(ValueError, match="q_weight and k_weight"):
        ops.qk_norm_rope(torch.zeros(1, 48), 1, 1, 16, pos, torch.zeros(4, 16), torch.ones(16), None, 1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cpu_models_take_the_c_kernels_by_default_and_match_hf(ops, tiny_ckpt, arch, monkeypatch):
    from tests.models.test_parity import check_against_hf

    calls = {"rope": 0, "silu": 0}
    for name, key in (("qk_norm_rope", "rope"), ("silu_mul", "silu")):
        real = getattr(ops, name)

        def counted(*a, _real=real, _key=key, **kw):
            calls[_key] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(ops, name, counted)
    check_against_hf(tiny_ckpt(arch), decode_steps=2, fused="auto")
    assert all(calls.values()), calls  # the model really took each kernel


def test_auto_keeps_torch_ops_for_bfloat16_cpu_models(ops):
    norm = torch.nn.Sequential(RMSNorm(8, 1e-6, torch.bfloat16))
    assert use_fused_kernels(norm, "auto", torch.device("cpu")) == "off"
    assert norm[0].fused is None
    assert use_fused_kernels(norm.float(), "auto", torch.device("cpu")) == "native"
    assert norm[0].fused is ops
