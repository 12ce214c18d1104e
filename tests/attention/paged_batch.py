"""Random paged-attention batches for the kernel tests (imported by the test modules)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tidal.attention.base import AttentionMetadata

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class PagedBatch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_cache: torch.Tensor
    meta: AttentionMetadata


def make_paged_batch(ctx_lens: list[int], q_lens: list[int], *, num_q_heads: int, num_kv_heads: int,
                     head_dim: int, block_size: int, dtype: torch.dtype = torch.float32,
                     device: torch.device = DEVICE, pad_tokens: int = 0, extra_blocks: int = 3,
                     seed: int = 0) -> PagedBatch:
    """A batch of sequences with ctx_lens[i] cached tokens and q_lens[i] new ones.

    Blocks are handed out in a shuffled order (so block tables are not the identity), the cache
    is filled with random data (earlier context; unused slots too, so wrong reads show), and
    pad_tokens extra query rows with slot -1 are appended at the end.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    order = list(range(num_blocks))
    rng.shuffle(order)
    max_blocks = max(blocks_per_seq) + 1
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    slots, it = [], iter(order)
    for i, (ctx, n) in enumerate(zip(ctx_lens, q_lens)):
        table = [next(it) for _ in range(blocks_per_seq[i])]
        block_tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, ctx + n)]
    slots += [-1] * pad_tokens
    num_tokens = len(slots)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    kv_cache = rand(2, num_blocks, block_size, num_kv_heads, head_dim)
    q, k, v = rand(num_tokens, num_q_heads, head_dim), rand(num_tokens, num_kv_heads, head_dim), \
        rand(num_tokens, num_kv_heads, head_dim)
    query_start_loc = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=list(q_lens), seq_lens_cpu=seq_lens,
    )
    return PagedBatch(q.to(device), k.to(device), v.to(device), kv_cache.to(device), meta)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "output holds NaN"
    return ((out - ref).norm() / ref.norm()).item()
