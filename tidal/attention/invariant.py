"""Batch-invariant attention on the CPU (on CUDA: tidal.attention.cuda.CudaInvariantAttentionBackend):
a query's output depends only on its own q and on the keys and values at positions 0..p, never on
the other queries or sequences of the batch, on how the prompt was chunked, or on whether its
prefix came from the cache (EngineConfig.batch_invariant).

The torch reference (torch_ref) is not: SDPA blocks its matmuls and its softmax by the number of
query rows and keys, so the same query computed in a decode step, at the end of a prefill chunk,
or inside a whole prompt differs in the last bits. Here every reduction has a fixed shape:

- keys are cut into blocks of KEY_BLOCK at absolute positions 0, KEY_BLOCK, ...; a block past a
  query's position is fully masked and adds exact zeros;
- query rows are padded to whole tiles of ROW_TILE, so every matmul is a batch of
  [ROW_TILE*k, D] x [D, KEY_BLOCK] and [ROW_TILE*k, KEY_BLOCK] x [KEY_BLOCK, D] products whose
  rows sit in full micro-tiles (tidal.models.layers.Linear explains why that matters);
- the softmax is exact-max based: m = max over the visible keys (order-free), p = exp(s - m), and
  the per-block sums and partial outputs are added block after block (a cumulative sum, in
  sequence order), so extra masked blocks change nothing.
"""

from __future__ import annotations

import torch

from tidal.attention.base import AttentionBackend, AttentionMetadata, register_backend, store_kv
from tidal.attention.torch_ref import gather_kv

KEY_BLOCK = 64
ROW_TILE = 16
QUERY_CHUNK = 256  # query rows per pass, to bound the [Hq, blocks, rows, D] partials


def invariant_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D]; K/V already stored in kv_cache [2, NB, BS, Hkv, D]. Returns [T, Hq, D]."""
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if q_len:
            k, v = _blocks(*gather_kv(kv_cache, meta.block_tables[i], seq_len), q.shape[1])
            for a in range(0, q_len, QUERY_CHUNK):
                b = min(a + QUERY_CHUNK, q_len)
                first = seq_len - q_len + a
                out[start + a : start + b] = _attend(q[start + a : start + b], k, v, first, scale).to(q.dtype)
        start += q_len
    return out


def _blocks(k: torch.Tensor, v: torch.Tensor, num_q_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, Hkv, D] -> [Hq, blocks, KEY_BLOCK, D] float32, zero-padded to whole blocks."""
    seq_len, num_kv_heads, head_dim = k.shape
    padded = -(-seq_len // KEY_BLOCK) * KEY_BLOCK
    group = num_q_heads // num_kv_heads

    def split(x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x.float(), x.new_zeros(padded - seq_len, num_kv_heads, head_dim, dtype=torch.float32)])
        x = x.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S_pad, D]
        return x.reshape(num_q_heads, padded // KEY_BLOCK, KEY_BLOCK, head_dim)

    return split(k), split(v)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, scale: float) -> torch.Tensor:
    """Queries q [L, Hq, D] at positions first..first+L-1 over key blocks k, v [Hq, NB, KB, D]."""
    rows = q.shape[0]
    padded = -(-rows // ROW_TILE) * ROW_TILE
    num_heads, num_blocks = k.shape[:2]
    qf = q.float().transpose(0, 1)  # [Hq, L, D]
    # Padding rows repeat the last query (its position too), so they stay finite.
    qf = torch.cat([qf, qf[:, -1:].expand(num_heads, padded - rows, -1)], dim=1)
    q_pos = (first + torch.arange(padded)).clamp(max=first + rows - 1)
    k_pos = torch.arange(num_blocks * KEY_BLOCK).view(num_blocks, 1, KEY_BLOCK)
    visible = k_pos <= q_pos[None, :, None]  # [NB, rows, KB]
    s = torch.matmul(qf[:, None], k.transpose(-1, -2)) * scale  # [Hq, NB, rows, KB]
    s.masked_fill_(~visible, float("-inf"))
    m = s.amax(dim=(1, 3), keepdim=True)  # exact, order-free
    p = (s - m).exp_()
    denom = p.sum(dim=-1).cumsum(dim=1)[:, -1]  # [Hq, rows]
    num = torch.matmul(p, v).cumsum(dim=1)[:, -1]  # [Hq, rows, D]
    return (num / denom[..., None])[:, :rows].transpose(0, 1)


@register_backend("invariant")
class InvariantAttentionBackend(AttentionBackend):
    """The batch-invariant backend of the tensors' device: the torch code above on the CPU, the
    Triton kernels on CUDA (tidal.attention.cuda.CudaInvariantAttentionBackend)."""

    name = "invariant"
    batch_invariant = True

    def __init__(self) -> None:
        self._cuda: AttentionBackend | None = None

    def forward(self, q, k, v, kv_cache, meta, scale):
        if q.is_cuda:
            if self._cuda is None:
                from tidal.attention.cuda import CudaInvariantAttentionBackend  # imports Triton

                self._cuda = CudaInvariantAttentionBackend()
            return self._cuda.forward(q, k, v, kv_cache, meta, scale)
        store_kv(k, v, kv_cache, meta.slot_mapping)
        return invariant_attention(q, kv_cache, meta, scale)
