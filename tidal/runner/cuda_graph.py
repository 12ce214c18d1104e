"""CUDA graphs for decode steps, one per batch-size bucket.

A decode step (every sequence has one new token) is captured once per bucket on static input
buffers; a step of n sequences copies its inputs into the first n rows of the buffers, pads
the rest of the smallest bucket >= n, and replays that bucket's graph. Padding rows store
nothing (slot -1) and attend to nothing (seq_len 0), so the padding is harmless.

Invariant: the graphs hold raw pointers to the weights, the KV cache and these buffers; when
either of the first two moves (sleep/wake, a reallocation), drop this object and build another.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch
from torch import nn

from tidal.attention.base import AttentionBackend, AttentionMetadata
from tidal.attention.context import ForwardContext

if TYPE_CHECKING:
    from tidal.runner.runner import StepInputs


def default_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_bs (and max_bs itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16)) + [max_bs]
    return sorted(set(sizes))


class CudaGraphRunner:
    """Captures ``model(input_ids, positions, ctx) -> hidden`` for decode batches up to max_bs.

    ``max_blocks_per_seq`` bounds the width of the block table a step may bring (the model's
    max length in blocks); the split count of the decode kernel is fixed at capture for the
    longest possible context.
    """

    def __init__(
        self,
        model: nn.Module,
        kv_cache: torch.Tensor,
        backend: AttentionBackend,
        max_bs: int,
        max_blocks_per_seq: int,
        block_size: int,
        batch_sizes: list[int] | None = None,
    ) -> None:
        if kv_cache.device.type != "cuda":
            raise ValueError(f"kv_cache.device={kv_cache.device}: CUDA graphs need a CUDA device")
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.max_bs = max_bs
        self.max_blocks = max_blocks_per_seq
        self.block_size = block_size
        self.batch_sizes = sorted(batch_sizes or default_batch_sizes(max_bs))
        if self.batch_sizes[-1] < max_bs:
            raise ValueError(f"batch_sizes={self.batch_sizes}: the largest must be >= max_bs={max_bs}")
        dev, n = kv_cache.device, self.batch_sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        max_len = self.max_blocks * self.block_size
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=max_len,
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=[max_len] * bs,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        # Largest first, so the smaller graphs reuse the pool memory the largest one reserved.
        self.slot_mapping.fill_(-1)
        self.seq_lens.zero_()
        for bs in reversed(self.batch_sizes):
            ctx = ForwardContext(self._meta(bs), self.kv_cache, self.backend)
            ids, pos = self.input_ids[:bs], self.positions[:bs]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: Triton compiles, allocator settles
                self.model(ids, pos, ctx)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[bs] = self.model(ids, pos, ctx)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.kv_cache.device)

    def can_run(self, inputs: StepInputs) -> bool:
        meta = inputs.meta
        n = meta.seq_lens.shape[0]
        return (
            meta.max_query_len == 1
            and inputs.input_ids.shape[0] == n
            and 0 < n <= self.max_bs
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states [n, hidden_size] of a decode step of n sequences (a view into a static
        buffer: valid until the next replay)."""
        meta = inputs.meta
        n, width = meta.seq_lens.shape[0], meta.block_tables.shape[1]
        bs = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        self.input_ids[:n].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:n].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        # Columns past `width` keep stale entries: the kernel reads only the first
        # ceil(seq_len / block_size) of each row, all of which are written here.
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
