"""Fused Triton kernels for the decoder layers' small ops, and the switch that picks them.

In torch ops a decoder layer launches ~23 kernels (residual add, RMSNorm, q/k RMSNorm, concat,
six RoPE element-wise ops, SiLU, product): on the Qwen3-0.6B shape that was 661 kernels per decode
step and 1.3-1.7 ms of GPU time in these small ops, at batch 14 as at batch 256 (H100,
benchmarks/step_kernels.py). These kernels do the same math in three (296 kernels per step,
0.2-0.36 ms):

- ``add_rms_norm``: residual add + RMSNorm, one program per row;
- ``qk_norm_rope``: per-head RMSNorm of q and k (Qwen3) + neox RoPE from the cos/sin table,
  reading the fused qkv projection in place, one program per token;
- ``silu_mul``: SiLU(gate) * up over the fused gate_up projection.

Each matches the torch ops of tidal.models.layers to bf16 rounding (tested in Triton's
interpreter on the CPU). The torch ops remain the reference and the CPU path.

Which path runs is a property of each model, from EngineConfig.fused_kernels: "auto" (the
default) runs these kernels on CUDA and the same three ops in C on the CPU (tidal.kernels.cpu_native,
float32), "on" these kernels everywhere (Triton's interpreter on the CPU, for tests), "off" the
torch ops (the A/B measurements in benchmarks/throughput.py and vs_vllm_cpu.py). `use_fused_kernels` sets it on
every layer of a model; CUDA graphs keep whatever path they were captured with.
"""

from __future__ import annotations

import torch

from tidal.kernels.cpu_native import RowKernels
from tidal.kernels.utils import next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the torch ops serve
    triton = None

FUSED_MODES = ("auto", "on", "off")


def use_fused_kernels(model: torch.nn.Module, mode: str, device: torch.device) -> str:
    """Set every layer of `model` that has a fused path (a `fused` attribute) to the ops `mode`
    picks for a model on `device`: "auto" takes the Triton kernels on CUDA and the C kernels on
    the CPU (float32 models, where the C compiler built them); "on" the Triton kernels anywhere
    (Triton's interpreter on the CPU); "off" the torch ops. Returns "triton", "native" or "off"."""
    if mode not in FUSED_MODES:
        raise ValueError(f"fused_kernels={mode!r} is invalid: expected one of {list(FUSED_MODES)}")
    if mode == "on" and triton is None:
        raise ValueError("fused_kernels='on' needs Triton, which is not installed: expected 'auto' or 'off'")
    ops: TritonOps | RowKernels | None = None
    choice = "off"
    if triton is not None and (mode == "on" or (mode == "auto" and device.type == "cuda")):
        ops, choice = TritonOps(), "triton"
    elif mode == "auto" and device.type == "cpu" and all(p.dtype == torch.float32 for p in model.parameters()):
        from tidal.kernels.cpu_native import row_kernels

        ops = row_kernels()
        choice = "off" if ops is None else "native"
    for m in model.modules():
        if hasattr(m, "fused"):
            setattr(m, "fused", ops)  # noqa: B010 (nn.Module's own __setattr__ types exclude it)
    return choice


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        res_out_ptr,
        n,
        stride_x,
        stride_res,
        eps,
        HAS_RES: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=0.0)
        xf = x.to(tl.float32)
        if HAS_RES:
            # The sum is rounded to the activation dtype first, as `x + residual` in torch is.
            r = tl.load(res_ptr + row * stride_res + cols, mask=inside, other=0.0).to(tl.float32)
            x = (xf + r).to(x.dtype)
            tl.store(res_out_ptr + row * n + cols, x, mask=inside)
            xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + cols, (xf * rstd * w).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, inter, stride_gu, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < inter
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * inter + cols, (g / (1.0 + tl.exp(-g)) * u).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _qk_norm_rope_kernel(
        qkv_ptr,
        stride_qkv,
        pos_ptr,
        cos_sin_ptr,
        qw_ptr,
        kw_ptr,
        out_ptr,
        eps,
        NUM_Q: tl.constexpr,
        NUM_HEADS: tl.constexpr,
        HALF: tl.constexpr,
        HAS_NORM: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        # One program per token: its q and k heads [NUM_HEADS, 2 * HALF], as two halves.
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, HALF)[None, :]
        inside = (h < NUM_HEADS) & (d < HALF)
        src = qkv_ptr + t * stride_qkv + h * (2 * HALF) + d
        x1 = tl.load(src, mask=inside, other=0.0)
        x2 = tl.load(src + HALF, mask=inside, other=0.0)
        if HAS_NORM:
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF) + eps)
            is_q = h < NUM_Q
            w1 = tl.where(is_q, tl.load(qw_ptr + d), tl.load(kw_ptr + d)).to(tl.float32)
            w2 = tl.where(is_q, tl.load(qw_ptr + HALF + d), tl.load(kw_ptr + HALF + d)).to(tl.float32)
            # Rounded to the activation dtype, as the RMSNorm module's output is before RoPE.
            x1 = (f1 * rstd[:, None] * w1).to(x1.dtype)
            x2 = (f2 * rstd[:, None] * w2).to(x2.dtype)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * (2 * HALF) + d)
        sin = tl.load(cos_sin_ptr + pos * (2 * HALF) + HALF + d)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        dst = out_ptr + t * (NUM_HEADS * 2 * HALF) + h * (2 * HALF) + d
        tl.store(dst, (f1 * cos - f2 * sin).to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(dst + HALF, (f2 * cos + f1 * sin).to(out_ptr.dtype.element_ty), mask=inside)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name}.shape={tuple(x.shape)}: expected [tokens, features]")
    return x if x.stride(1) == 1 else x.contiguous()


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm(x + residual) * weight, and x + residual (the next residual; None without one)."""
    x = _rows(x, "x")
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    res_out = None
    if residual is not None:
        residual = _rows(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"residual.shape={tuple(residual.shape)}: expected {tuple(x.shape)} like x")
        res_out = torch.empty_like(out)
    if rows:
        _add_rms_norm_kernel[(rows,)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            res_out if res_out is not None else out,
            n,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            eps,
            HAS_RES=residual is not None,
            BLOCK=next_pow2(n),
            num_warps=4,
        )
    return out, res_out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up = [gate | up] along the last dim."""
    gate_up = _rows(gate_up, "gate_up")
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, next_pow2(inter))
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
            gate_up, out, inter, gate_up.stride(0), BLOCK=block, num_warps=4
        )
    return out


def qk_norm_rope(
    qkv: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """q and k of a fused qkv projection [T, (Hq + 2 Hkv) * D], each head RMSNormed (when the
    weights are given) then rotated (neox halves) at `positions` from `cos_sin` [max_pos, D]
    (cos | sin, float32). Returns [T, Hq + Hkv, D]: q heads, then k heads."""
    qkv = _rows(qkv, "qkv")
    tokens = qkv.shape[0]
    heads = num_q_heads + num_kv_heads
    if qkv.shape[1] < heads * head_dim or head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(
            f"qkv.shape={tuple(qkv.shape)}, head_dim={head_dim}: expected at least "
            f"{heads} heads of a power-of-two head_dim"
        )
    if cos_sin.shape[-1] != head_dim or cos_sin.dtype != torch.float32:
        raise ValueError(
            f"cos_sin: shape {tuple(cos_sin.shape)} {cos_sin.dtype}, expected [max_pos, {head_dim}] float32"
        )
    if (q_weight is None) != (k_weight is None):
        raise ValueError("q_weight and k_weight: give both (Qwen3 q/k norm) or neither")
    out = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens:
        has_norm = q_weight is not None
        _qk_norm_rope_kernel[(tokens,)](
            qkv,
            qkv.stride(0),
            positions,
            cos_sin,
            q_weight if has_norm else cos_sin,
            k_weight if has_norm else cos_sin,
            out,
            eps,
            NUM_Q=num_q_heads,
            NUM_HEADS=heads,
            HALF=head_dim // 2,
            HAS_NORM=has_norm,
            BLOCK_H=next_pow2(heads),
            num_warps=4,
        )
    return out


class TritonOps:
    """The Triton kernels above, as one of the two FusedOps."""

    add_rms_norm = staticmethod(add_rms_norm)
    qk_norm_rope = staticmethod(qk_norm_rope)
    silu_mul = staticmethod(silu_mul)


# A layer's `fused` attribute holds one implementation of the three ops, or None for the torch
# ops: the Triton kernels (TritonOps) or the CPU's C kernels (tidal.kernels.cpu_native.RowKernels),
# both with the signatures of the functions above.
FusedOps = TritonOps | RowKernels
