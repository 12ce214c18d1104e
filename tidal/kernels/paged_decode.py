"""Paged decode attention (one new token per sequence), flash-decoding style.

Grid (seq, kv_head, split): each program reads a contiguous chunk of one sequence's context
through its block table and attends with all the query heads that share that KV head, so K/V
are loaded once per GQA group. With several splits, a second kernel merges the partial
results by their log-sum-exp. Everything the kernels need comes from device tensors and the
grid from static shapes, so a decode step can be captured in a CUDA graph.

Batch invariance (`split_size`): by default the chunk of a split is seq_len / num_splits, and
num_splits depends on the batch (`default_num_splits`), so a sequence's reduction order changes
with what else is in the batch. With a fixed split size, split j of every sequence covers tokens
[j * split_size, (j + 1) * split_size), and the merge walks the sequence's own splits in order
(online log-sum-exp), so the grid's split count only adds empty programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels.paged_kv import load_kv_tile
from tidal.kernels.utils import check_cache, dot_precision, interpreting, next_pow2, num_sms

_LOG2E = 1.4426950408889634


# The block-table width changes from step to step: no kernel variant per width class.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_slot,
    stride_cache_head,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLIT_SIZE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    if SPLIT_SIZE > 0:
        chunk = SPLIT_SIZE
    else:
        chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    gd_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=gd_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head * stride_cache_head
    for n0 in range(start, end, BLOCK_N):
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
            d < HEAD_DIM,
            stride_cache_slot,
            BLOCK_SIZE,
            BLOCK_N,
            DOT_FP32,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=gd_mask,
        )
    else:
        # part_out: [B, Hq, NUM_SPLITS, BLOCK_D] fp32; part_lse: [B, Hq, NUM_SPLITS] fp32 (log2 units)
        row = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + d[None, :], o, mask=(g < GROUP)[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g < GROUP)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SPLIT_SIZE: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq.to(tl.int64) * tl.num_programs(1) + head
    d = tl.arange(0, BLOCK_D)
    if SPLIT_SIZE > 0:
        # In order over this sequence's own splits only: the same sums whatever NUM_SPLITS is.
        own = tl.cdiv(tl.load(seq_lens_ptr + seq), SPLIT_SIZE)
        m = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s in range(0, own):
            lse = tl.load(part_lse_ptr + row * NUM_SPLITS + s)
            part = tl.load(part_out_ptr + (row * NUM_SPLITS + s) * BLOCK_D + d)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + part * w
            total = total * alpha + w
            m = m_new
        o = acc / tl.where(total > 0.0, total, 1.0)
    else:
        s = tl.arange(0, BLOCK_S)
        s_mask = s < NUM_SPLITS
        lse = tl.load(part_lse_ptr + row * NUM_SPLITS + s, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)  # empty sequence: every weight is 0
        w = tl.exp2(lse - m)
        parts = tl.load(
            part_out_ptr + (row * NUM_SPLITS + s)[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None], other=0.0
        )
        total = tl.sum(w, 0)
        o = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM
    )


def default_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device, min_chunk: int = 256, max_splits: int = 32
) -> int:
    """Split only when (sequence, kv head) programs cannot fill the SMs once: then enough splits to
    fill them a few times over, but no chunk shorter than min_chunk. On an H200 a batch that
    fills them already reads at 95-100% of the copy bandwidth unsplit, and 2-3 splits cost 7-25%
    (benchmarks/decode_attention.py, results/decode_attention_h200.json)."""
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= num_sms(device):
        return 1
    want = triton.cdiv(4 * num_sms(device), programs)
    return max(1, min(want, triton.cdiv(max_seq_len, min_chunk), max_splits))


def paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int = 1,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    split_size: int | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D], one query per sequence; reads the paged cache [2, NB, BS, Hkv, D].

    seq_lens (device, int32) include the new token, which must already be in the cache.
    A sequence of length 0 gets zeros. Returns out [B, Hq, D] in q's dtype.

    split_size (batch-invariant mode): every split covers exactly that many tokens (a multiple
    of block_n); num_splits must then cover the longest sequence (`fixed_num_splits`), and a
    sequence's output no longer depends on num_splits or on the rest of the batch.
    """
    check_cache(kv_cache)
    num_seqs, num_q_heads, head_dim = q.shape
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
    if num_seqs == 0:
        return out
    group = num_q_heads // num_kv_heads
    block_d = next_pow2(head_dim)
    interp = interpreting()
    if block_n is None:
        block_n = 16 if interp else 64
    if split_size is not None and (split_size <= 0 or split_size % block_n):
        raise ValueError(f"split_size={split_size}: expected a positive multiple of block_n={block_n}")
    grid = (num_seqs, num_kv_heads, num_splits)
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_q_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _decode_split_kernel[grid](
        q,
        kv_cache[0],
        kv_cache[1],
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        GROUP=group,
        BLOCK_G=max(16, next_pow2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_FP32=interp,
        PRECISION=dot_precision(q),
        SPLIT_SIZE=split_size or 0,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_q_heads)](
            out,
            part_out,
            part_lse,
            seq_lens,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            NUM_SPLITS=num_splits,
            BLOCK_S=next_pow2(num_splits),
            SPLIT_SIZE=split_size or 0,
        )
    return out


def fixed_num_splits(max_seq_len: int, split_size: int) -> int:
    """Splits of `split_size` tokens that cover max_seq_len (pass max_model_len under CUDA graphs)."""
    return max(1, triton.cdiv(max_seq_len, split_size))
