"""y = x W^T (+ b) whose row i depends only on x[i], W and b: the batch-invariant linear layer.

cuBLAS picks its kernel, tile shape and split-K from the problem shape, M included, so the same
row computed in a batch of 1 and in a batch of 256 is summed in another order. This kernel has one
fixed configuration per dtype (BLOCK_M/N/K, warps, stages) and no split-K: every output element
is one K loop over BLOCK_K slices in order, each slice a full-shape tl.dot tile (rows past M and
columns past K load zeros, which add exact zeros). M only changes the grid.

Grid order: the M tiles of one N tile are neighbours, so a weight tile is read from memory once
and reused from L2 by the other row tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidal.kernels import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the invariant CPU path does not need this kernel
    triton = None


@dataclass(frozen=True, slots=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# One configuration per input dtype, never chosen from the shape: it fixes the reduction order.
CONFIGS = {
    torch.bfloat16: MatmulConfig(64, 64, 64, 4, 4),
    torch.float16: MatmulConfig(64, 64, 64, 4, 4),
    torch.float32: MatmulConfig(64, 64, 32, 4, 3),
}


if triton is not None:
    # M changes every step: no kernel variant per M (value-1 or divisible-by-16 specialisation).
    @triton.jit(do_not_specialize=["M"])
    def _matmul_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr,
        DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        m_tiles = tl.cdiv(M, BLOCK_M)
        pid_m = pid % m_tiles
        pid_n = pid // m_tiles
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_mask = rm < M
        n_mask = rn < N
        x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :]
        w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = (k0 + rk) < K
            a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if DOT_FP32:  # the interpreter's tl.dot has no 16-bit floats (exact products either way)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=m_mask[:, None] & n_mask[None, :],
        )


def matmul(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K]^T (+ b [N]) -> [M, N] in x's dtype, accumulated in float32; row i of the
    result depends only on x[i] (bitwise, whatever M is)."""
    if triton is None:
        raise RuntimeError("tidal.kernels.matmul needs Triton, which is not installed")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x.shape={tuple(x.shape)}, w.shape={tuple(w.shape)}: expected x [M, K] and w [N, K]")
    if x.dtype != w.dtype or x.dtype not in CONFIGS:
        raise ValueError(f"x.dtype={x.dtype}, w.dtype={w.dtype}: expected one dtype of {list(CONFIGS)}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"b.shape={tuple(b.shape)}: expected ({w.shape[0]},)")
    x = x if x.stride(1) == 1 else x.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    (m, k), n = x.shape, w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    cfg = CONFIGS[x.dtype]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    # float32 multiplies in full precision ("ieee"), not TF32; 16-bit inputs are exact either way.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _matmul_kernel[grid](
        x,
        w,
        b if b is not None else w,
        y,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        y.stride(0),
        HAS_BIAS=b is not None,
        PRECISION=precision,
        DOT_FP32=interpreting(),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y
