"""CUDA attention backend: Triton kernels for the KV store, paged decode and paged prefill.

Same semantics as the torch reference (tidal.attention.torch_ref). The decode path reads only
device tensors and launches a grid fixed by static shapes, so it can be captured in a CUDA
graph; the host-side fields of the metadata pick the path and the number of KV splits.
"""

from __future__ import annotations

import torch

from tidal.attention.base import AttentionBackend, AttentionMetadata, register_backend
from tidal.kernels.invariant_attention import invariant_paged_attention
from tidal.kernels.kv_store import store_kv_triton
from tidal.kernels.paged_decode import default_num_splits, paged_decode
from tidal.kernels.paged_prefill import paged_prefill


@register_backend("cuda")
class CudaAttentionBackend(AttentionBackend):
    name = "cuda"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv_triton(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        num_seqs = meta.seq_lens.shape[0]
        if meta.max_query_len == 1 and q.shape[0] == num_seqs:
            splits = default_num_splits(num_seqs, kv_cache.shape[3], meta.max_seq_len, q.device)
            return paged_decode(q, kv_cache, meta.block_tables, meta.seq_lens, scale, out=out, num_splits=splits)
        return paged_prefill(
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len, scale, out=out
        )


class CudaInvariantAttentionBackend(AttentionBackend):
    """Batch-invariant attention with Triton (EngineConfig.batch_invariant on CUDA; the "invariant"
    backend delegates here for CUDA tensors).

    Every row, decode rows included, goes through one kernel with fixed, position-aligned tiles
    (tidal.kernels.invariant_attention): a decode token is a chunk of length 1, so a query at
    position p is computed the same way in a decode step, in any chunk of its prefill and in a
    whole prompt, whatever shares the step. The default backend picks the decode kernel for
    pure-decode steps and the prefill kernel otherwise, so there a decode token's bits depend on
    whether a prefill shares its step. The grid comes from static shapes (max_query_len is 1 in a
    captured decode step), so decode steps run in CUDA graphs; a graph's padding rows (seq_len 0)
    are not written, their outputs unspecified as in the default backend.
    """

    name = "invariant"
    batch_invariant = True

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv_triton(k, v, kv_cache, meta.slot_mapping)
        return invariant_paged_attention(
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len, scale
        )
