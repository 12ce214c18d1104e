"""Triton kernels against the torch reference, on small shapes.

Without a GPU they run in Triton's interpreter on the CPU (see conftest.py), in float32 and
bfloat16; on a GPU the same tests run natively.
"""
from __future__ import annotations

import pytest
import torch

from tests.attention.paged_batch import DEVICE, make_paged_batch, rel_err
from tidal.attention.base import get_backend, store_kv
from tidal.attention.torch_ref import paged_attention_ref
from tidal.attention.triton_decode import paged_decode
from tidal.attention.triton_kv_store import store_kv_triton
from tidal.attention.triton_prefill import paged_prefill

pytestmark = pytest.mark.triton_interpret

# Float32 on a GPU goes through tf32 in tl.dot; in the interpreter it is exact float32.
TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_reference_and_skips_padding(block_size, dtype):
    b = make_paged_batch([5, 0, 17], [1, 9, 3], num_q_heads=4, num_kv_heads=2, head_dim=64,
                         block_size=block_size, dtype=dtype, pad_tokens=2)
    # K and V as views into a fused qkv projection: rows are strided.
    qkv = torch.randn(b.k.shape[0], 8, 64, device=DEVICE).to(dtype)
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    ref = b.kv_cache.clone()
    store_kv(k, v, ref, b.meta.slot_mapping)
    out = b.kv_cache.clone()
    store_kv_triton(k, v, out, b.meta.slot_mapping)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("block_size,head_dim,group", [
    (4, 64, 1), (16, 64, 2), (16, 128, 4), (32, 128, 2), (8, 64, 4), (16, 64, 7),
])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(block_size, head_dim, group, num_splits):
    ctx = [0, 7, block_size - 1, block_size, 2 * block_size + 5, 41]
    b = make_paged_batch(ctx, [1] * len(ctx), num_q_heads=2 * group, num_kv_heads=2, head_dim=head_dim,
                         block_size=block_size, seed=block_size + group)
    store_kv(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    ref = paged_attention_ref(b.q, b.kv_cache, b.meta, scale=head_dim ** -0.5)
    out = torch.full_like(b.q, float("nan"))
    paged_decode(b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, head_dim ** -0.5, out=out,
                 num_splits=num_splits)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_more_splits_than_blocks_and_empty_sequence(num_splits):
    # A padded batch row (seq_len 0, as CUDA-graph padding produces) gives zeros, not NaN.
    b = make_paged_batch([2, 0], [1, 1], num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16)
    store_kv(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    ref = paged_attention_ref(b.q, b.kv_cache, b.meta, scale=0.125)
    seq_lens = torch.cat([b.meta.seq_lens, torch.zeros(1, dtype=torch.int32, device=DEVICE)])
    tables = torch.cat([b.meta.block_tables, b.meta.block_tables[:1]])
    q = torch.cat([b.q, b.q[:1]])
    out = paged_decode(q, b.kv_cache, tables, seq_lens, 0.125, num_splits=num_splits)
    assert rel_err(out[:2], ref) < TOL[torch.float32]
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("block_size,head_dim,group", [
    (4, 64, 1), (16, 64, 2), (16, 128, 4), (8, 128, 2), (16, 64, 7),
])
def test_prefill_with_prefix_context_and_decodes(block_size, head_dim, group):
    # Fresh prompts, prompts after a cached prefix, and decode rows in one batch.
    ctx = [0, 0, block_size, 13, 30, 0]
    q_lens = [1, 23, 17, 1, 5, 2 * block_size + 3]
    b = make_paged_batch(ctx, q_lens, num_q_heads=2 * group, num_kv_heads=2, head_dim=head_dim,
                         block_size=block_size, seed=7 * group + block_size)
    store_kv(b.k, b.v, b.kv_cache, b.meta.slot_mapping)
    ref = paged_attention_ref(b.q, b.kv_cache, b.meta, scale=head_dim ** -0.5)
    out = torch.full_like(b.q, float("nan"))
    paged_prefill(b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, b.meta.query_start_loc,
                  b.meta.max_query_len, head_dim ** -0.5, out=out)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["decode", "mixed"])
def test_backend_matches_torch_backend(dtype, kind):
    if kind == "decode":
        ctx, q_lens, pad = [3, 16, 40], [1, 1, 1], 0
    else:
        ctx, q_lens, pad = [3, 0, 20, 16], [1, 12, 6, 1], 3
    b = make_paged_batch(ctx, q_lens, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
                         dtype=dtype, pad_tokens=pad, seed=3)
    ref_cache, cache = b.kv_cache.clone(), b.kv_cache.clone()
    ref = get_backend("torch").forward(b.q, b.k, b.v, ref_cache, b.meta, 0.125)
    out = get_backend("cuda").forward(b.q, b.k, b.v, cache, b.meta, 0.125)
    assert torch.equal(cache, ref_cache)
    n = sum(q_lens)  # padding rows belong to no sequence: their output is unspecified
    assert rel_err(out[:n].float(), ref[:n].float()) < TOL[dtype]
