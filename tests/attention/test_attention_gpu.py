"""The CUDA backend on a GPU: bf16 on realistic shapes against the float32 reference, and
capture of the decode step in a CUDA graph. Run on the device with `pytest -m gpu`."""
from __future__ import annotations

import random

import pytest
import torch

from tests.attention.paged_batch import make_paged_batch, rel_err
from tidal.attention.base import get_backend, store_kv
from tidal.attention.torch_ref import paged_attention_ref
from tidal.kernels.paged_decode import paged_decode
from tidal.kernels.paged_prefill import paged_prefill

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_TOL = 1e-2
# (q heads, kv heads, head_dim) of Qwen3-0.6B, Qwen2.5-0.5B, Qwen2.5-7B
SHAPES = [(16, 8, 128), (14, 2, 64), (28, 4, 128)]


def _ref32(b, scale):
    return paged_attention_ref(b.q.float(), b.kv_cache.float(), b.meta, scale)


@pytest.mark.parametrize("heads", SHAPES)
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("num_splits", [1, 8, None])
def test_decode_bf16(heads, block_size, num_splits):
    hq, hkv, d = heads
    rng = random.Random(block_size)
    ctx = [rng.randint(0, 3000) for _ in range(40)] + [0, 1, block_size - 1, block_size, 4095]
    b = make_paged_batch(ctx, [1] * len(ctx), num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                         block_size=block_size, dtype=torch.bfloat16, seed=hq + block_size)
    store_kv(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    ref = _ref32(b, d ** -0.5)
    if num_splits is None:
        out = get_backend("cuda").forward(b.q, b.k, b.v, b.kv_cache, b.meta, d ** -0.5)
    else:
        out = paged_decode(b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, d ** -0.5,
                           num_splits=num_splits)
    assert rel_err(out, ref) < BF16_TOL


@pytest.mark.parametrize("heads", SHAPES)
@pytest.mark.parametrize("block_size", [16, 256])
def test_prefill_mixed_bf16(heads, block_size):
    hq, hkv, d = heads
    ctx = [0, 0, 512, 37, 1000, 5, 0]
    q_lens = [1, 700, 300, 1, 129, 64, 1500]
    b = make_paged_batch(ctx, q_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                         block_size=block_size, dtype=torch.bfloat16, pad_tokens=5, seed=hq)
    ref_cache = b.kv_cache.clone()
    out = get_backend("cuda").forward(b.q, b.k, b.v, b.kv_cache, b.meta, d ** -0.5)
    store_kv(b.k, b.v, ref_cache, b.meta.slot_mapping)
    assert torch.equal(b.kv_cache, ref_cache)
    n = sum(q_lens)
    assert rel_err(out[:n], _ref32(b, d ** -0.5)[:n]) < BF16_TOL


def test_prefill_kernel_matches_sdpa_on_long_prompt():
    b = make_paged_batch([0], [4096], num_q_heads=16, num_kv_heads=8, head_dim=128, block_size=256,
                         dtype=torch.bfloat16)
    store_kv(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    out = paged_prefill(b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, b.meta.query_start_loc,
                        b.meta.max_query_len, 128 ** -0.5)
    q, k, v = (t.float().transpose(0, 1) for t in (b.q, b.k.repeat_interleave(2, 1), b.v.repeat_interleave(2, 1)))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=128 ** -0.5)
    assert rel_err(out, ref.transpose(0, 1)) < BF16_TOL


def test_decode_step_replays_in_cuda_graph():
    """Capture one decode forward on static buffers, then change every input in place."""
    backend = get_backend("cuda")
    bs, hq, hkv, d, block_size, max_blocks = 32, 16, 8, 128, 16, 64
    b = make_paged_batch([max_blocks * block_size - 1] * bs, [1] * bs, num_q_heads=hq, num_kv_heads=hkv,
                         head_dim=d, block_size=block_size, dtype=torch.bfloat16)
    static = b
    # Capture with max_seq_len at its largest, so the captured split count suits any length.
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        backend.forward(static.q, static.k, static.v, static.kv_cache, static.meta, d ** -0.5)  # compile
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(static.q, static.k, static.v, static.kv_cache, static.meta, d ** -0.5)

    for seed in range(3):
        rng = random.Random(seed)
        ctx = [rng.randint(0, max_blocks * block_size - 2) for _ in range(bs)]
        new = make_paged_batch(ctx, [1] * bs, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                               block_size=block_size, dtype=torch.bfloat16, seed=seed + 1,
                               extra_blocks=static.kv_cache.shape[1] - sum(-(-(c + 1) // block_size) for c in ctx))
        for name in ("q", "k", "v", "kv_cache"):
            getattr(static, name).copy_(getattr(new, name))
        static.meta.slot_mapping.copy_(new.meta.slot_mapping)
        static.meta.seq_lens.copy_(new.meta.seq_lens)
        static.meta.block_tables.zero_()
        static.meta.block_tables[:, :new.meta.block_tables.shape[1]].copy_(new.meta.block_tables)
        graph.replay()
        ref_cache = new.kv_cache.clone()
        ref = get_backend("torch").forward(new.q.float(), new.k.float(), new.v.float(), ref_cache.float(),
                                           new.meta, d ** -0.5)
        assert rel_err(out, ref) < BF16_TOL
