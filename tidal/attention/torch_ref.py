"""Pure-PyTorch reference attention over the paged KV cache (CPU, tests, and the oracle
the CUDA kernels are checked against). Loops over sequences; clarity over speed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tidal.attention.base import AttentionBackend, AttentionMetadata, register_backend, store_kv


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, Hkv, D] of one sequence, read through its block table."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return k, v


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    num_q_heads = q.shape[1]
    starts = [0]
    for n in meta.query_lens_cpu:
        starts.append(starts[-1] + n)
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        qs, qe = starts[i], starts[i + 1]
        q_len = qe - qs
        if q_len == 0:
            continue
        k, v = gather_kv(kv_cache, meta.block_tables[i], seq_len)
        group = num_q_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1).float()  # [Hq, S, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1).float()
        qi = q[qs:qe].transpose(0, 1).float()  # [Hq, Lq, D]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [Lq, S]
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[qs:qe] = o.transpose(0, 1).to(q.dtype)
    return out


@register_backend("torch")
class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    # Not invariant: SDPA's reduction differs between a decode row, a chunk's end and a whole prompt
    # (tests/runner/test_numerics_invariance.py shows it); EngineConfig.batch_invariant uses "invariant".
    batch_invariant = False

    def forward(self, q, k, v, kv_cache, meta, scale):
        store_kv(k, v, kv_cache, meta.slot_mapping)
        return paged_attention_ref(q, kv_cache, meta, scale)
