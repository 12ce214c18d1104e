"""The sampler's race on the GPU: per-token hash noise, the floor mask and the argmax of one row's
scores in one kernel (tidal.runner.sampler defines the race and its torch twin; the two agree
bit for bit, which tests/runner/test_sampler.py checks)."""

from __future__ import annotations

import torch
from torch import Tensor

from tidal.kernels.utils import num_sms

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the torch path serves
    triton = None

if triton is not None:

    @triton.jit
    def _mix32_tl(x):
        x = x ^ (x >> 16)
        x = x * 0x21F0AAAD
        x = x ^ (x >> 15)
        x = x * 0x735A2D97
        return x ^ (x >> 15)

    @triton.jit
    def _race_kernel(
        x_ptr,
        x_stride,
        ids_ptr,
        ids_stride,
        floor_ptr,
        seeds_ptr,
        steps_ptr,
        score_ptr,
        col_ptr,
        n,
        chunk,
        HAS_IDS: tl.constexpr,
        HAS_FLOOR: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # One program per (row, slice of `chunk` columns): the slice's best score and its column.
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        begin = split * chunk
        end = tl.minimum(begin + chunk, n)
        seed = tl.load(seeds_ptr + row)
        step = tl.load(steps_ptr + row)
        key = _mix32_tl((seed & 0xFFFFFFFF).to(tl.uint32) ^ 0x27D4EB2F)  # as row_keys
        key = _mix32_tl(key ^ ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
        key = _mix32_tl(key ^ (step & 0xFFFFFFFF).to(tl.uint32))
        floor = float("-inf")
        if HAS_FLOOR:
            floor = tl.load(floor_ptr + row)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_col = tl.zeros([BLOCK], dtype=tl.int32) + begin
        for start in range(begin, end, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < end
            x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=float("-inf"))
            if HAS_IDS:
                tok = tl.load(ids_ptr + row * ids_stride + cols, mask=inside, other=0).to(tl.uint32)
            else:
                tok = cols.to(tl.uint32)
            bits = _mix32_tl(_mix32_tl(tok ^ 0x5BD1E995) ^ key)
            u = bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
            u = tl.minimum(u, 0.99999994039535522)
            z = 1.0 - u
            e = tl.where(z == 1.0, u, u * (tl.log(z) / (z - 1.0)))
            score = tl.where(x < floor, float("-inf"), x - tl.log(e))
            take = score > best
            best = tl.where(take, score, best)
            best_col = tl.where(take, cols, best_col)
        top = tl.max(best, axis=0)
        col = tl.min(tl.where(best == top, best_col, n), axis=0)
        n_splits = tl.num_programs(1)
        tl.store(score_ptr + row * n_splits + split, top)
        tl.store(col_ptr + row * n_splits + split, col.to(tl.int64))


RACE_BLOCK = 1024


def race_triton(x: Tensor, floor: Tensor | None, seeds: Tensor, steps: Tensor, ids: Tensor | None) -> Tensor:
    """The sampler's race (tidal.runner.sampler: hash, exponential noise, argmax) as one kernel."""
    rows, n = x.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    # Enough programs to fill the GPU at small batches: split each row into slices, then take
    # the first best slice (slices are in column order, so ties still go to the lowest column).
    splits = max(1, min(triton.cdiv(n, RACE_BLOCK), triton.cdiv(8 * num_sms(x.device), rows)))
    chunk = triton.cdiv(triton.cdiv(n, splits), RACE_BLOCK) * RACE_BLOCK
    splits = triton.cdiv(n, chunk)
    x = x if x.stride(1) == 1 else x.contiguous()
    if ids is not None and ids.stride(1) != 1:
        ids = ids.contiguous()
    floor_arg = floor.reshape(rows).contiguous() if floor is not None else x
    scores = torch.empty(rows, splits, dtype=torch.float32, device=x.device)
    cols = torch.empty(rows, splits, dtype=torch.int64, device=x.device)
    _race_kernel[(rows, splits)](
        x,
        x.stride(0),
        ids if ids is not None else x,
        ids.stride(0) if ids is not None else 0,
        floor_arg,
        seeds.contiguous(),
        steps.contiguous(),
        scores,
        cols,
        n,
        chunk,
        HAS_IDS=ids is not None,
        HAS_FLOOR=floor is not None,
        BLOCK=RACE_BLOCK,
        num_warps=4,
    )
    if splits == 1:
        return cols.squeeze(1)
    return cols.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
