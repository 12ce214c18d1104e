"""Batch-invariant paged attention with the heads of a GQA group in one tile (the CUDA invariant
backend's kernel).

Every row, decode rows too, is a query of a chunk: a decode token is a chunk of length 1. A
program takes BLOCK_P consecutive positions of one sequence and the GROUP query heads that share
one KV head, as BLOCK_P * GROUP_PAD rows of one tile, so K/V are read once per group (the plain
prefill kernel reads them once per query head, GROUP times the traffic of a decode step). Tiles
start at absolute positions that are multiples of BLOCK_P, so query (p, h) always sits in row
(p % BLOCK_P) * GROUP_PAD + h % GROUP of its tile, however the prompt was chunked and whatever
else is in the batch; key tiles start at multiples of BLOCK_N, and key tiles past a row's position
are fully masked for it and add exact zeros (alpha = 1, p = 0). Online softmax as in
tidal.kernels.paged_prefill. Grid (tile, seq, kv head) from static shapes: CUDA-graph safe.
"""

from __future__ import annotations

import torch

from tidal.kernels import interpreting
from tidal.kernels.paged_kv import load_kv_tile

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the torch invariant backend serves
    triton = None

_LOG2E = 1.4426950408889634
ROWS = 16  # rows per tile (BLOCK_P positions x GROUP_PAD heads): the smallest tl.dot tile
BLOCK_N = 64  # keys per step
NUM_WARPS = 4
NUM_STAGES = 2

if triton is not None:

    @triton.jit(do_not_specialize=["stride_bt"])
    def _invariant_attention_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        block_tables_ptr,
        seq_lens_ptr,
        query_start_loc_ptr,
        out_ptr,
        scale_log2,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_cache_slot,
        stride_cache_head,
        stride_bt,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        BLOCK_P: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        tile = tl.program_id(0)
        seq = tl.program_id(1)
        kv_head = tl.program_id(2)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx_len = seq_len - q_len
        if ctx_len < 0:  # a CUDA graph's padding row (seq_len 0): nothing to attend to, nothing written
            return
        tile_pos = (ctx_len // BLOCK_P + tile) * BLOCK_P
        if tile_pos >= seq_len:
            return

        r = tl.arange(0, BLOCK_P * GROUP_PAD)
        q_pos = tile_pos + r // GROUP_PAD
        g = r % GROUP_PAD
        m = q_pos - ctx_len
        r_mask = (m >= 0) & (m < q_len) & (g < GROUP)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        rows = (q_start + m).to(tl.int64)
        heads = kv_head * GROUP + g
        rd_mask = r_mask[:, None] & d_mask[None, :]
        q = tl.load(
            q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=rd_mask, other=0.0
        )
        if DOT_FP32:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_P * GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_P * GROUP_PAD], tl.float32)
        acc = tl.zeros([BLOCK_P * GROUP_PAD, BLOCK_D], tl.float32)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        head_off = kv_head * stride_cache_head
        # Keys past the tile's last position are masked for every row: stop there.
        end = tl.minimum(seq_len, tile_pos + BLOCK_P)
        for n0 in range(0, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            n_mask = pos < end
            k, v = load_kv_tile(
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
                BLOCK_SIZE,
                BLOCK_N,
                DOT_FP32,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            # Key 0 is visible to every row (q_pos >= 0), so no row is fully masked (no NaN).
            s = tl.where((pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        o = acc / l_i[:, None]
        tl.store(
            out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=rd_mask,
        )


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def invariant_paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D] (the new tokens of every sequence, concatenated); their K/V already stored in
    kv_cache [2, NB, BS, Hkv, D]. Returns out [T, Hq, D] in q's dtype; rows of sequences with
    seq_len 0 (graph padding) are not written."""
    if triton is None:
        raise RuntimeError("invariant_paged_attention needs Triton, which is not installed")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous():
        raise ValueError(
            f"kv_cache.shape={tuple(kv_cache.shape)}: expected a contiguous [2, num_blocks, "
            "block_size, num_kv_heads, head_dim]"
        )
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_head_dim = kv_cache.shape
    if cache_head_dim != head_dim or num_q_heads % num_kv_heads or q.stride(-1) != 1:
        raise ValueError(
            f"q.shape={tuple(q.shape)} does not fit kv_cache.shape={tuple(kv_cache.shape)}: expected "
            "the same head_dim, num_q_heads divisible by num_kv_heads and a contiguous head_dim"
        )
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    group_pad = _pow2(group)
    block_p = max(1, ROWS // group_pad)
    # An aligned chunk may start mid-tile, so it can touch one tile more.
    grid = (triton.cdiv(max_query_len, block_p) + 1, num_seqs, num_kv_heads)
    interp = interpreting()
    _invariant_attention_kernel[grid](
        q,
        kv_cache[0],
        kv_cache[1],
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_P=block_p,
        HEAD_DIM=head_dim,
        BLOCK_D=_pow2(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_N=BLOCK_N,
        DOT_FP32=interp,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out
