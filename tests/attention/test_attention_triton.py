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
from tidal.kernels.paged_decode import paged_decode
from tidal.kernels.kv_store import store_kv_triton
from tidal.kernels.paged_prefill import paged_prefill

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


# --- batch invariance (EngineConfig.batch_invariant; docs/numerics.md) ---------------------------

def _pool(num_blocks: int, block_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, num_blocks, block_size, 2, 32, generator=gen).to(DEVICE)


def _tables(lens: list[int], block_size: int, num_blocks: int, rng, width: int = 0) -> torch.Tensor:
    width = max(width, max(-(-n // block_size) for n in lens) + 1)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, n in enumerate(lens):
        tables[i, : -(-n // block_size)] = torch.tensor(rng.sample(range(num_blocks), -(-n // block_size)))
    return tables.to(DEVICE)


def test_decode_with_a_fixed_split_size_is_bitwise_batch_invariant():
    import random

    from tidal.kernels.paged_decode import fixed_num_splits
    rng = random.Random(0)
    block_size, split, nb = 16, 32, 64
    cache = _pool(nb, block_size, seed=1)
    target_len, target_q = 77, torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    target_table = _tables([target_len], block_size, nb, rng)
    seq_lens = torch.tensor([target_len], dtype=torch.int32, device=DEVICE)
    alone = paged_decode(target_q, cache, target_table, seq_lens, 0.2, split_size=split,
                         num_splits=fixed_num_splits(target_len, split))
    b = make_paged_batch([target_len - 1], [1], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16)
    ref = paged_attention_ref(target_q, cache, type(b.meta)(
        slot_mapping=b.meta.slot_mapping, query_start_loc=b.meta.query_start_loc, seq_lens=seq_lens,
        block_tables=target_table, max_query_len=1, max_seq_len=target_len, query_lens_cpu=[1],
        seq_lens_cpu=[target_len]), 0.2)
    assert rel_err(alone, ref) < TOL[torch.float32]
    for size in (2, 5, 9):
        lens = [rng.randrange(0, 200) for _ in range(size)]
        pos = rng.randrange(size)
        lens[pos] = target_len
        tables = _tables(lens, block_size, nb, rng, width=target_table.shape[1])
        tables[pos, :] = 0
        tables[pos, :target_table.shape[1]] = target_table[0]
        q = torch.randn(size, 4, 32).to(DEVICE)
        q[pos] = target_q[0]
        lens_d = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
        for splits in (fixed_num_splits(max(lens), split), fixed_num_splits(512, split)):
            out = paged_decode(q, cache, tables, lens_d, 0.2, split_size=split, num_splits=splits)
            assert torch.equal(out[pos], alone[0]), (size, pos, splits)


def test_decode_rejects_a_split_size_off_the_tile():
    b = make_paged_batch([8], [1], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16)
    with pytest.raises(ValueError, match="split_size=24"):
        paged_decode(b.q, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, 0.2, split_size=24, block_n=16)


def test_prefill_rows_are_bitwise_invariant_to_chunking_and_batch():
    import random

    rng = random.Random(3)
    block_size, nb = 16, 48
    cache = _pool(nb, block_size, seed=4)
    prompt = 70
    table = _tables([prompt], block_size, nb, rng)
    q_all = torch.randn(prompt, 4, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def run(pieces: list[tuple[int, int]], target: int) -> torch.Tensor:
        """pieces: (ctx, q_len) per sequence; sequence `target` is the prompt, the others random."""
        lens = [c + n for c, n in pieces]
        tables = _tables(lens, block_size, nb, rng, width=table.shape[1])
        tables[target, :] = 0
        tables[target, :table.shape[1]] = table[0]
        qs = []
        for i, (c, n) in enumerate(pieces):
            qs.append(q_all[c:c + n] if i == target else torch.randn(n, 4, 32).to(DEVICE))
        qsl = torch.tensor([0] + torch.tensor([n for _, n in pieces]).cumsum(0).tolist(), dtype=torch.int32)
        q = torch.cat(qs)
        out = paged_prefill(q, cache, tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE), qsl.to(DEVICE),
                            max(n for _, n in pieces), 0.2, aligned=True)
        start = int(qsl[target])
        return out[start:start + pieces[target][1]]

    whole = run([(0, prompt)], 0)
    b = make_paged_batch([0], [prompt], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=block_size)
    meta = type(b.meta)(slot_mapping=b.meta.slot_mapping, query_start_loc=b.meta.query_start_loc,
                        seq_lens=b.meta.seq_lens, block_tables=table, max_query_len=prompt, max_seq_len=prompt,
                        query_lens_cpu=[prompt], seq_lens_cpu=[prompt])
    assert rel_err(whole, paged_attention_ref(q_all, cache, meta, 0.2)) < TOL[torch.float32]
    for ctx, end in [(0, 30), (30, 70), (17, 18), (69, 70), (40, 57)]:
        got = run([(5, 9), (ctx, end - ctx), (0, 33)], 1)
        assert torch.equal(got, whole[ctx:end]), (ctx, end)
