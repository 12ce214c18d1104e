"""CudaGraphRunner on a GPU: replayed decode steps match the eager forward for batch sizes that
hit a bucket exactly and ones that need padding. Run on the device with `pytest -m gpu`."""
from __future__ import annotations

import random

import pytest
import torch

from tidal.attention.base import AttentionMetadata, get_backend
from tidal.models import load_model
from tidal.attention.context import ForwardContext
from tidal.runner.cuda_graph import CudaGraphRunner, default_batch_sizes
from tidal.runner.runner import StepInputs

def gpu(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


def test_default_batch_sizes():
    assert default_batch_sizes(1) == [1]
    assert default_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert default_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]


def _decode_inputs(n: int, block_size: int, num_blocks: int, vocab: int, seed: int) -> StepInputs:
    rng = random.Random(seed)
    ctx = [rng.randint(0, 100) for _ in range(n)]
    blocks = list(range(num_blocks))
    rng.shuffle(blocks)
    width = max(c // block_size + 1 for c in ctx)
    tables = torch.zeros(n, width, dtype=torch.int32)
    slots = []
    for i, c in enumerate(ctx):
        row = [blocks.pop() for _ in range(c // block_size + 1)]
        tables[i, :len(row)] = torch.tensor(row)
        slots.append(row[c // block_size] * block_size + c % block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device="cuda"),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor([c + 1 for c in ctx], dtype=torch.int32, device="cuda"),
        block_tables=tables.cuda(), max_query_len=1, max_seq_len=max(ctx) + 1,
        query_lens_cpu=[1] * n, seq_lens_cpu=[c + 1 for c in ctx])
    ids = torch.tensor([rng.randrange(vocab) for _ in range(n)], device="cuda")
    pos = torch.tensor(ctx, device="cuda")
    return StepInputs(ids, pos, meta, torch.arange(n, device="cuda"))


@gpu
@torch.inference_mode()
def test_graph_replay_matches_eager(tiny_ckpt):
    model = load_model(tiny_ckpt("qwen3"), torch.bfloat16, "cuda")
    a = model.arch
    block_size, num_blocks = 16, 8 * 8 + 4
    torch.manual_seed(0)
    kv_cache = torch.randn(a.num_layers, 2, num_blocks, block_size, a.num_kv_heads, a.head_dim,
                           device="cuda").to(torch.bfloat16)
    backend = get_backend("cuda")
    graphs = CudaGraphRunner(model, kv_cache, backend, max_bs=8, max_blocks_per_seq=8, block_size=block_size)
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    for step, n in enumerate([1, 3, 8, 5]):
        inputs = _decode_inputs(n, block_size, num_blocks, a.vocab_size, seed=step)
        assert graphs.can_run(inputs)
        cache0 = kv_cache.clone()
        eager_cache = kv_cache.clone()
        eager = model(inputs.input_ids, inputs.positions, ForwardContext(inputs.meta, eager_cache, backend))
        kv_cache.copy_(cache0)
        out = graphs.run(inputs)
        torch.cuda.synchronize()
        assert out.shape == eager.shape
        assert torch.equal(kv_cache, eager_cache)
        err = ((out.float() - eager.float()).norm() / eager.float().norm()).item()
        assert err < 1e-2, f"n={n}: relative error {err}"


@gpu
def test_can_run_rejects_prefill_and_oversize(tiny_ckpt):
    model = load_model(tiny_ckpt("qwen3"), torch.bfloat16, "cuda")
    a = model.arch
    kv_cache = torch.zeros(a.num_layers, 2, 20, 16, a.num_kv_heads, a.head_dim, dtype=torch.bfloat16, device="cuda")
    graphs = CudaGraphRunner(model, kv_cache, get_backend("cuda"), max_bs=2, max_blocks_per_seq=4, block_size=16)
    inputs = _decode_inputs(3, 16, 20, a.vocab_size, seed=0)
    assert not graphs.can_run(inputs)
    inputs = _decode_inputs(2, 16, 20, a.vocab_size, seed=0)
    inputs.meta.max_query_len = 2
    assert not graphs.can_run(inputs)
