"""CPU attention backend: decode as the whole batch at once, no Python loop over sequences.

Sequences are split into two groups — decode rows (one new token) and prefill rows (a prompt,
a chunk of one, or a prompt after a prefix-cache hit).

Decode rows (float32) go to the C kernel of tidal.kernels.cpu_native, which reads each
sequence's blocks in place through the block table. Prefill rows run one sequence at a time (a
step holds few prompts, each hundreds of rows, so the loop is a few calls per layer and saves
the padding of a batch to its longest prompt): a whole prompt (no cached context) as one causal
SDPA over the step's own keys and values; a chunk after cached context as SDPA calls over slices
of PREFILL_Q_CHUNK query rows, each against its sequence's gathered keys up to the slice's last
row. Decode with no C compiler on the machine, another dtype, or TIDAL_CPU_NATIVE=0 runs as one
padded batch of tensor ops: one index op gathers every sequence's blocks into a [B, S_max, Hkv, D]
view of its keys and values and one masked scaled-dot-product attention covers the group (the
query heads of a KV head are stacked as rows, so each KV head is read once). Prefill is
compute-bound and SDPA's blocked kernel is the fast way to do it; decode is a copy-bound gather
that the kernel removes (3.3x on the decode shape of benchmarks/vs_vllm_cpu.py's small
checkpoint).

Not batch invariant: in the tensor-op decode path a row's softmax and its weighted sum of values run
over the padded length S_max of its group, so the reduction order (and the last bits of a row's
result) can change with the other sequences in the batch. Masked keys contribute exact zeros;
both paths match the reference to float32 rounding.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from tidal.attention.base import AttentionBackend, AttentionMetadata, register_backend, store_kv
from tidal.kernels.cpu_native import decode_kernel


def gather_kv_batch(
    kv_cache: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, Hkv, S, D] of every row of block_tables, S = max_seq_len rounded up to
    whole blocks; slots past a sequence's length hold whatever its padding blocks hold."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-max_seq_len // block_size)
    batch, (_, total, _, heads, dim) = block_tables.shape[0], kv_cache.shape
    blocks = block_tables[:, :num_blocks].reshape(-1).long()
    # index_select over flat blocks: several times faster on CPU than advanced indexing.
    kv = kv_cache.view(2, total, -1).index_select(1, blocks)
    kv = kv.view(2, batch, num_blocks * block_size, heads, dim).transpose(2, 3)  # [2, B, Hkv, S, D]
    return kv[0], kv[1]


def _attend(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    q_pos: torch.Tensor,
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """One padded group: q [B, L, Hq, D] with positions q_pos [B, L]. Returns [B, L, Hq, D] in
    float32; query slots past a sequence's own rows are padding (any finite result)."""
    k, v = gather_kv_batch(kv_cache, block_tables, max_seq_len)
    batch, length, num_q_heads, dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    # The `group` query heads that share a KV head become extra query rows of that head, so SDPA
    # reads each KV head once ([B, Hkv, L*G, D] against [B, Hkv, S, D]).
    qg = q.unflatten(2, (num_kv_heads, group)).transpose(1, 2).reshape(batch, num_kv_heads, length * group, dim)
    k_pos = torch.arange(k.shape[2], device=q.device)
    # Causal mask; every query sees key 0, so no row is fully masked (padding slots included).
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [B, L, S]
    if group > 1 and length > 1:  # one query per sequence (decode): the mask broadcasts instead
        mask = mask.repeat_interleave(group, dim=1)
    o = F.scaled_dot_product_attention(qg.float(), k.float(), v.float(), attn_mask=mask[:, None], scale=scale)
    return o.view(batch, num_kv_heads, length, group, dim).transpose(1, 2).reshape(batch, length, num_q_heads, dim)


def paged_attention_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, Hq, D] and this step's keys and values k, v [T, Hkv, D] (already stored in kv_cache)."""
    q_lens = meta.query_lens_cpu
    num_tokens = sum(q_lens)
    if meta.max_query_len == 1 and num_tokens == len(q_lens) == q.shape[0]:
        # Pure decode, no padding rows: token i is sequence i's query.
        kernel = decode_kernel()
        if kernel is not None and kernel.supports(q, kv_cache):
            return kernel(q, kv_cache, meta.block_tables, meta.seq_lens, scale, meta.cpu_threads)
        o = _attend(
            q[:, None], kv_cache, meta.block_tables, (meta.seq_lens.long() - 1)[:, None], meta.max_seq_len, scale
        )
        return o[:, 0].to(q.dtype)
    out = torch.empty_like(q) if num_tokens == q.shape[0] else torch.zeros_like(q)
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    # Whole prompts (no cached context) attend only to this step's own keys; prompt chunks after
    # earlier chunks and prompts after a prefix hit also read the cache.
    fresh = [i for i, n in enumerate(q_lens) if n > 1 and meta.seq_lens_cpu[i] == n]
    continued = [i for i, n in enumerate(q_lens) if 1 < n < meta.seq_lens_cpu[i]]
    if decode:
        _decode_group(q, kv_cache, meta, scale, out, decode)
    if fresh:
        _fresh_prefill_group(q, k, v, meta, scale, out, fresh)
    if continued:
        _prefill_group(q, kv_cache, meta, scale, out, continued)
    return out


def _decode_group(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor, seqs: list[int]
) -> None:
    idx = torch.tensor(seqs, device=q.device)
    rows = meta.query_start_loc[idx].long()
    kernel = decode_kernel()
    if kernel is not None and kernel.supports(q, kv_cache):
        out[rows] = kernel(q[rows], kv_cache, meta.block_tables[idx], meta.seq_lens[idx], scale, meta.cpu_threads).to(
            out.dtype
        )
        return
    max_len = max(meta.seq_lens_cpu[i] for i in seqs)
    o = _attend(
        q[rows][:, None], kv_cache, meta.block_tables[idx], (meta.seq_lens[idx].long() - 1)[:, None], max_len, scale
    )
    out[rows] = o[:, 0].to(out.dtype)


def _row_starts(meta: AttentionMetadata) -> list[int]:
    """Each sequence's first query row (query_start_loc, from the host-side query lengths)."""
    return list(itertools.accumulate(meta.query_lens_cpu, initial=0))


# Query rows per SDPA call of a prompt chunk that reads cached context: each call reads the keys up
# to its own last row, so the masked (future) part computed is at most this many keys per row.
PREFILL_Q_CHUNK = 256


def _prefill_group(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float, out: torch.Tensor, seqs: list[int]
) -> None:
    """Prompt chunks after cached context (earlier chunks, prefix hits), one sequence at a time: its
    blocks gathered into contiguous keys and values [Hkv, S, D], its queries in slices of
    PREFILL_Q_CHUNK rows, each against the keys up to the slice's last position with a causal mask.
    No padding to the group's longest sequence and no mask over keys no row of the slice can see."""
    block_size = kv_cache.shape[2]
    heads, dim = kv_cache.shape[-2:]
    starts = _row_starts(meta)
    for i in seqs:
        n, seq_len = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
        ctx, start = seq_len - n, starts[i]
        blocks = meta.block_tables[i, : -(-seq_len // block_size)].long()
        kv = kv_cache.view(2, kv_cache.shape[1], -1).index_select(1, blocks).view(2, -1, heads, dim)[:, :seq_len]
        k, v = kv.transpose(1, 2).float()  # [Hkv, S, D] each
        for a in range(0, n, PREFILL_Q_CHUNK):
            b = min(a + PREFILL_Q_CHUNK, n)
            keys = ctx + b
            mask = torch.ones(b - a, keys, dtype=torch.bool, device=q.device).tril_(ctx + a)
            qs = q[start + a : start + b].transpose(0, 1).float()  # [Hq, rows, D]
            o = F.scaled_dot_product_attention(
                qs[None], k[None, :, :keys], v[None, :, :keys], attn_mask=mask, scale=scale, enable_gqa=True
            )
            out[start + a : start + b] = o[0].transpose(0, 1).to(out.dtype)


def _fresh_prefill_group(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    seqs: list[int],
) -> None:
    """Whole prompts, one at a time: causal SDPA on the prompt's own rows of this step's q, k, v
    (views, [1, Hq|Hkv, L, D]), no gather from the cache, no padding to the longest prompt of the
    step and no mask tensor (SDPA's causal kernel also skips the masked half). A step's prompts are
    few and long, so the loop costs a few calls per layer; padding them to one batch computed up to
    1.8x the attention of the prompts themselves on benchmarks/vs_vllm_cpu.py's long workload."""
    starts = _row_starts(meta)
    for i in seqs:
        a = starts[i]
        b = a + meta.query_lens_cpu[i]
        qb, kb, vb = (t[a:b].transpose(0, 1)[None].float() for t in (q, k, v))
        o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
        out[a:b] = o[0].transpose(0, 1).to(out.dtype)


@register_backend("cpu")
class CpuAttentionBackend(AttentionBackend):
    name = "cpu"
    batch_invariant = False

    def forward(self, q, k, v, kv_cache, meta, scale):
        store_kv(k, v, kv_cache, meta.slot_mapping)
        return paged_attention_cpu(q, k, v, kv_cache, meta, scale)
