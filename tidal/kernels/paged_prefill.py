"""Paged prefill/extend attention: causal flash attention whose keys come through the block table.

Handles any mix of sequences: a sequence with q_len new tokens and seq_len - q_len tokens of
cached context (a prefix-cache hit, or earlier chunks) attends to the whole context plus the new
tokens causally; decode rows (q_len 1) are the special case. Grid (query tile, seq, q head).

Batch invariance (`aligned=True`): query tiles start at absolute positions that are multiples of
BLOCK_M, so a query at position p sits in row p % BLOCK_M of its tile however the prompt was
chunked; key tiles already start at multiples of BLOCK_N, and fully masked key tiles add exact
zeros. A matmul's row can depend on where it sits in the tile (the interpreter's BLAS micro-
kernels do), never on the other rows' values, so every query is then computed the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels.paged_kv import load_kv_tile
from tidal.kernels.utils import check_cache, dot_precision, interpreting, next_pow2

_LOG2E = 1.4426950408889634


# The block-table width changes from step to step: no kernel variant per width class.
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len
    # First position of this tile: ctx_len + m_block * BLOCK_M, or tile-aligned (ALIGNED).
    tile_pos = ctx_len + m_block * BLOCK_M
    if ALIGNED:
        tile_pos = (ctx_len // BLOCK_M + m_block) * BLOCK_M
    if tile_pos >= seq_len:
        return

    q_pos = tile_pos + tl.arange(0, BLOCK_M)
    m = q_pos - ctx_len
    d = tl.arange(0, BLOCK_D)
    m_mask = (m >= 0) & (m < q_len)
    d_mask = d < HEAD_DIM
    rows = (q_start + m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = (head // GROUP) * stride_cache_head
    # Keys past the tile's last query are masked for every row: stop there.
    end = tl.minimum(seq_len, tile_pos + BLOCK_M)
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
        # Key 0 is visible to every row, so no row is fully masked in the first tile (no NaN).
        s = tl.where((pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def paged_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    aligned: bool = False,
) -> torch.Tensor:
    """q: [T, Hq, D] (new tokens of all sequences, concatenated); K/V already stored in the cache.

    Returns out [T, Hq, D] in q's dtype. Rows of sequences with q_len 0 are not written.
    aligned: query tiles at absolute multiples of block_m (batch-invariant mode, module doc).
    """
    check_cache(kv_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_head_dim = kv_cache.shape
    if cache_head_dim != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(
            f"q.shape={tuple(q.shape)} does not fit kv_cache.shape={tuple(kv_cache.shape)}: "
            "expected the same head_dim and num_q_heads divisible by num_kv_heads"
        )
    if q.stride(-1) != 1:
        raise ValueError("q needs a contiguous last (head_dim) dimension")
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    interp = interpreting()
    block_d = next_pow2(head_dim)
    if block_m is None:
        block_m = 16 if interp else (128 if block_d <= 64 else 64)
    if block_n is None:
        block_n = 16 if interp else 64
    if num_warps is None:
        num_warps = 4
    # An aligned chunk may start mid-tile, so it can touch one tile more.
    grid = (triton.cdiv(max_query_len, block_m) + int(aligned), num_seqs, num_q_heads)
    _prefill_kernel[grid](
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
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_FP32=interp,
        PRECISION=dot_precision(q),
        ALIGNED=aligned,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
