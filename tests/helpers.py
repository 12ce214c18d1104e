"""Helpers for tests only: scaled-RoPE configs and a minimal paged-KV driver for model tests."""
from __future__ import annotations

import torch

from tidal.attention.base import AttentionMetadata, get_backend
from tidal.attention.context import ForwardContext

# For tests of scaled RoPE: make_tiny_checkpoint(path, "llama", rope_parameters=dict(LLAMA3_ROPE)).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128}


class PagedRunner:
    """Minimal paged-KV driver for model tests: each sequence owns a fixed run of blocks (block 0
    is never handed out, so padding bugs show up), new tokens are fed via ``step``."""

    def __init__(self, model, num_seqs: int, max_len: int, block_size: int = 4, backend: str = "cpu"):
        arch = model.arch
        param = next(model.parameters())
        self.model, self.block_size = model, block_size
        self.blocks_per_seq = -(-max_len // block_size)
        num_blocks = 1 + num_seqs * self.blocks_per_seq
        self.kv_cache = torch.zeros(arch.num_layers, 2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim,
                                    dtype=param.dtype, device=param.device)
        self.block_tables = torch.tensor(
            [[1 + i * self.blocks_per_seq + j for j in range(self.blocks_per_seq)] for i in range(num_seqs)],
            dtype=torch.int32, device=param.device)
        self.backend = get_backend(backend)
        self.lens = [0] * num_seqs

    @torch.no_grad()
    def step(self, new_tokens: list[list[int]]) -> list[torch.Tensor]:
        """Feed ``new_tokens[i]`` to sequence i (may be empty); returns each sequence's logits
        [len(new_tokens[i]), vocab] float32."""
        device = self.kv_cache.device
        ids, positions, slots, q_lens, seq_lens = [], [], [], [], []
        for i, toks in enumerate(new_tokens):
            start = self.lens[i]
            for p in range(start, start + len(toks)):
                positions.append(p)
                block = int(self.block_tables[i, p // self.block_size])
                slots.append(block * self.block_size + p % self.block_size)
            ids += toks
            q_lens.append(len(toks))
            seq_lens.append(start + len(toks))
            self.lens[i] += len(toks)
        qsl = [0]
        for n in q_lens:
            qsl.append(qsl[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=self.block_tables, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=q_lens, seq_lens_cpu=seq_lens)
        ctx = ForwardContext(meta=meta, kv_cache=self.kv_cache, backend=self.backend)
        hidden = self.model(torch.tensor(ids, dtype=torch.int64, device=device),
                            torch.tensor(positions, dtype=torch.int64, device=device), ctx)
        logits = self.model.compute_logits(hidden)
        return list(logits.split(q_lens))
