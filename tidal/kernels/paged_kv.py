"""The paged-KV tile load that every attention kernel's key loop shares: BLOCK_N keys of one KV
head, found through a sequence's block-table row."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the torch attention backends serve
    triton = None

if triton is not None:

    @triton.jit
    def load_kv_tile(
        k_cache_ptr,
        v_cache_ptr,
        bt_row,
        n0,
        pos,
        n_mask,
        head_off,
        d,
        d_mask,
        stride_cache_slot,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """K and V [BLOCK_N, BLOCK_D] at positions `pos` (= n0 + arange(BLOCK_N), masked by
        n_mask; masked rows load zeros), in float32 when DOT_FP32 (the interpreter)."""
        if BLOCK_SIZE % BLOCK_N == 0:
            # The whole tile lies in one cache block: one table lookup, contiguous rows.
            blk = tl.load(bt_row + n0 // BLOCK_SIZE).to(tl.int64)
            slots = blk * BLOCK_SIZE + (n0 % BLOCK_SIZE) + tl.arange(0, BLOCK_N)
        else:
            blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            slots = blk * BLOCK_SIZE + pos % BLOCK_SIZE
        offs = slots[:, None] * stride_cache_slot + head_off + d[None, :]
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=nd_mask, other=0.0)
        v = tl.load(v_cache_ptr + offs, mask=nd_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        return k, v
