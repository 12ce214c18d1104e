"""Fused KV store: one program per new token copies its K and V rows into the paged cache."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels.utils import check_cache, next_pow2


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token: nothing to store
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < NUM_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    src_k = k_ptr + t.to(tl.int64) * stride_kt + h[:, None] * stride_kh + d[None, :]
    src_v = v_ptr + t.to(tl.int64) * stride_vt + h[:, None] * stride_vh + d[None, :]
    dst = slot * stride_cache_slot + h[:, None] * stride_cache_head + d[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, Hkv, D] (last dim contiguous); kv_cache: [2, NB, BS, Hkv, D]; slot -1 is skipped."""
    check_cache(kv_cache)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if tuple(kv_cache.shape[-2:]) != (num_heads, head_dim) or v.shape != k.shape:
        raise ValueError(
            f"k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}: expected [T, "
            f"{kv_cache.shape[-2]}, {kv_cache.shape[-1]}] to match kv_cache"
        )
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous last (head_dim) dimension")
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping.shape={tuple(slot_mapping.shape)}: expected [{num_tokens}]")
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        kv_cache[0],
        kv_cache[1],
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(num_heads),
        BLOCK_D=next_pow2(head_dim),
    )
