"""Per-step state handed to the model: attention metadata, the KV cache, the backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidal.attention.base import AttentionBackend, AttentionMetadata


@dataclass(slots=True)
class ForwardContext:
    meta: AttentionMetadata
    kv_cache: torch.Tensor  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    backend: AttentionBackend

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return self.backend.forward(q, k, v, self.kv_cache[layer_idx], self.meta, scale)
