"""Reductions over the vocabulary, one program per row, in a fixed order: the sampler's
batch-invariant path (EngineConfig.batch_invariant on CUDA).

torch's CUDA reductions (logsumexp, softmax's sum, cumsum) choose how to split a row over thread
blocks from the number of rows, so a row's sum is added in another order when the batch changes.
Here a row is walked in BLOCK-wide slices from column 0: each lane keeps its own running sum, and
the lanes are added by one tl.sum of fixed shape at the end. The max is exact (order-free).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the sampler's torch path serves
    triton = None

BLOCK = 1024
NUM_WARPS = 4

if triton is not None:

    @triton.jit
    def _row_max_and_sum(base, n, BLOCK: tl.constexpr):
        """max of the row (0 for an all -inf row, so that exp(x - shift) stays 0) and sum exp(x - max)."""
        cols = tl.arange(0, BLOCK)
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, n, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < n, other=float("-inf")).to(tl.float32)
            top = tl.maximum(top, x)
        shift = tl.max(top, 0)
        shift = tl.where(shift == float("-inf"), 0.0, shift)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            x = tl.load(base + start + cols, mask=start + cols < n, other=float("-inf")).to(tl.float32)
            acc += tl.exp(x - shift)
        return shift, tl.sum(acc, 0)

    @triton.jit
    def _logsumexp_kernel(x_ptr, stride_x, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        shift, total = _row_max_and_sum(x_ptr + row * stride_x, n, BLOCK)
        tl.store(out_ptr + row, shift + tl.log(total))

    @triton.jit
    def _softmax_cumsum_kernel(x_ptr, stride_x, out_ptr, stride_o, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = x_ptr + row * stride_x
        shift, total = _row_max_and_sum(base, n, BLOCK)
        cols = tl.arange(0, BLOCK)
        carry = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        for start in range(0, n, BLOCK):
            inside = start + cols < n
            x = tl.load(base + start + cols, mask=inside, other=float("-inf")).to(tl.float32)
            c = tl.cumsum(tl.exp(x - shift) / total, 0) + carry
            tl.store(out_ptr + row * stride_o + start + cols, c, mask=inside)
            carry = tl.sum(tl.where(cols == BLOCK - 1, c, 0.0), 0)  # the slice's last prefix


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if triton is None:
        raise RuntimeError(f"tidal.kernels.rowwise.{name} needs Triton, which is not installed")
    if x.dim() != 2:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected [rows, vocab]")
    return x if x.stride(1) == 1 else x.contiguous()


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of x [B, V] -> [B] float32 (-inf for an all -inf row)."""
    x = _rows(x, "row_logsumexp")
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _logsumexp_kernel[(x.shape[0],)](x, x.stride(0), out, x.shape[1], BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def row_softmax_cumsum(x: torch.Tensor) -> torch.Tensor:
    """softmax(x).cumsum over the last dim of x [B, V] -> [B, V] float32 (top-p's cumulative mass)."""
    x = _rows(x, "row_softmax_cumsum")
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _softmax_cumsum_kernel[(x.shape[0],)](
            x, x.stride(0), out, out.stride(0), x.shape[1], BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return out
