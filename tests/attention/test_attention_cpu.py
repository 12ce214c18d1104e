"""The batched CPU backend against the per-sequence torch reference (the oracle), on both of its
decode paths: the C kernel reading the block table in place, and the gather + SDPA tensor ops
(what runs where no C compiler is found)."""
from __future__ import annotations

import os
import random
import shutil

import pytest
import torch

import tidal.attention.cpu as cpu_backend
from tests.attention.paged_batch import make_paged_batch
from tidal.attention.base import get_backend
from tidal.config import EngineConfig
from tidal.kernels import cpu_native

ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(params=["native", "tensor_ops"])
def decode_path(request, monkeypatch):
    if request.param == "tensor_ops":
        monkeypatch.setattr(cpu_backend, "decode_kernel", lambda: None)
    return request.param


def test_the_native_kernel_builds_where_a_c_compiler_exists():
    if not (shutil.which("cc") or shutil.which("gcc")) or os.environ.get("TIDAL_CPU_NATIVE") == "0":
        pytest.skip("no C compiler on this machine (or TIDAL_CPU_NATIVE=0): the tensor-op path runs")
    assert cpu_native.decode_kernel() is not None


def _both(b, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    ref_cache, cpu_cache = b.kv_cache.clone(), b.kv_cache.clone()
    ref = get_backend("torch").forward(b.q, b.k, b.v, ref_cache, b.meta, scale)
    out = get_backend("cpu").forward(b.q, b.k, b.v, cpu_cache, b.meta, scale)
    assert torch.equal(cpu_cache, ref_cache), "the KV store differs from the reference's"
    return out, ref


def _share_prefix(b, src: int, dst: int, num_blocks: int) -> None:
    """A prefix-cache hit: sequence dst reads the first num_blocks blocks of sequence src."""
    b.meta.block_tables[dst, :num_blocks] = b.meta.block_tables[src, :num_blocks]


def _random_mix(rng: random.Random, block_size: int) -> tuple[list[int], list[int]]:
    """Decode rows, whole prompts, chunks after earlier chunks, and prompts after a prefix hit."""
    ctx, q = [], []
    for _ in range(rng.randint(2, 9)):
        kind = rng.choice(["decode", "prefill", "chunk", "prefix"])
        if kind == "decode":
            c, n = rng.randint(0, 5 * block_size), 1
        elif kind == "prefill":
            c, n = 0, rng.randint(2, 3 * block_size)
        elif kind == "chunk":
            c, n = rng.randint(1, 4 * block_size), rng.randint(2, 2 * block_size)
        else:
            c, n = block_size * rng.randint(1, 3), rng.randint(1, 2 * block_size)
        ctx.append(c)
        q.append(n)
    return ctx, q


@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (7, 1), (6, 3)])
def test_random_mixed_batches_match_reference(block_size, num_q_heads, num_kv_heads, decode_path):
    rng = random.Random(block_size * 100 + num_q_heads * 10 + num_kv_heads)
    for trial in range(3):
        ctx, q = _random_mix(rng, block_size)
        b = make_paged_batch(ctx, q, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=32,
                             block_size=block_size, seed=trial, pad_tokens=trial)
        hits = [i for i, c in enumerate(ctx) if c >= block_size]
        if len(hits) >= 2:
            shared = min(ctx[hits[0]], ctx[hits[1]]) // block_size
            _share_prefix(b, hits[0], hits[1], shared)
        out, ref = _both(b, scale=32 ** -0.5)
        real = sum(q)
        torch.testing.assert_close(out[:real], ref[:real], atol=ATOL[torch.float32], rtol=0,
                                   msg=lambda m: f"ctx={ctx} q={q} trial={trial}: {m}")
        assert torch.equal(out[real:], torch.zeros_like(out[real:])), "padding rows must be zeros"


@pytest.mark.parametrize("q_lens", [[1] * 6, [9, 3, 17], [1, 12, 1, 1, 30]])
def test_decode_prefill_and_mixed_batches(q_lens, decode_path):
    ctx = [0, 7, 15, 16, 33, 41][:len(q_lens)]
    b = make_paged_batch(ctx, q_lens, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16, seed=3)
    out, ref = _both(b, scale=0.125)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


def test_bfloat16_tracks_reference():
    b = make_paged_batch([5, 0, 20], [1, 9, 4], num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=8,
                         dtype=torch.bfloat16)
    out, ref = _both(b, scale=0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[torch.bfloat16], rtol=0)


def test_strided_qkv_views_like_the_model_passes():
    # The model hands q/k/v as views into one fused projection (rows strided).
    b = make_paged_batch([3, 0], [1, 6], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=4)
    qkv = torch.randn(b.q.shape[0], 8, 32)
    b.q, b.k, b.v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    out, ref = _both(b, scale=0.2)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


def test_cpu_is_the_auto_default_on_cpu_and_declares_batch_invariance():
    assert EngineConfig(device="cpu").attention_backend == "cpu"
    assert EngineConfig(device="cpu", attention_backend="torch").attention_backend == "torch"
    assert get_backend("cpu").batch_invariant is False
    assert get_backend("torch").batch_invariant is False
    assert get_backend("invariant").batch_invariant is True
    assert EngineConfig(device="cpu", batch_invariant=True).attention_backend == "invariant"
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(device="cpu", batch_invariant=True, attention_backend="cpu")


def _decode_batch(num_seqs: int, num_q_heads: int, num_kv_heads: int, head_dim: int, seed: int = 0,
                  min_len: int = 0, max_len: int = 70):
    rng = random.Random(seed)
    ctx = [rng.randint(min_len, max_len) for _ in range(num_seqs)]
    return make_paged_batch(ctx, [1] * num_seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                            head_dim=head_dim, block_size=16, seed=seed)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(16, 1, 128), (4, 2, 256), (6, 2, 24), (34, 2, 64), (4, 2, 512)])
def test_native_decode_at_its_limits_and_past_them(num_q_heads, num_kv_heads, head_dim):
    """Query groups up to 16 heads and head_dim up to 256 take the kernel (head_dim a multiple of
    16 through its vector pass, others through its scalar loop); past either limit, the batch
    falls back to the tensor ops (same results)."""
    kernel = cpu_native.decode_kernel()
    if kernel is None:
        pytest.skip("no native kernel here")
    b = _decode_batch(5, num_q_heads, num_kv_heads, head_dim)
    takes = num_q_heads // num_kv_heads <= kernel.max_group and head_dim <= kernel.max_dim
    assert kernel.supports(b.q, b.kv_cache) is takes
    out, ref = _both(b, scale=head_dim ** -0.5)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8])
def test_native_decode_specialised_shapes_match_reference(head_dim, group):
    """The kernel's copies with compile-time sizes (head_dim 64 / 128 x GQA groups 1, 2, 4, 8; 3 takes
    the run-time one), over contexts from 0 to past several 16-token chunks, partial last chunks
    included."""
    rng = random.Random(head_dim + group)
    ctx = [0, 1, 15, 16, 17, 31, 33, 100] + [rng.randint(0, 300) for _ in range(4)]
    b = make_paged_batch(ctx, [1] * len(ctx), num_q_heads=2 * group, num_kv_heads=2, head_dim=head_dim,
                         block_size=16, seed=group)
    out, ref = _both(b, scale=head_dim ** -0.5)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


def test_native_decode_rows_do_not_depend_on_the_batch_or_the_thread_split(monkeypatch):
    """Each row is computed on its own, in a fixed order: the same row alone, inside a larger
    batch, and with the rows split across threads gives identical bits."""
    if cpu_native.decode_kernel() is None:
        pytest.skip("no native kernel here")
    kernel = cpu_native.DecodeKernel(cpu_native.library())  # its own thread pool, to see it used
    monkeypatch.setattr(cpu_native.DecodeKernel, "MIN_KEYS_PER_THREAD", 1)  # split even these short rows
    b = _decode_batch(9, 8, 2, 64, seed=4)
    m, cache = b.meta, b.kv_cache
    whole = kernel(b.q, cache, m.block_tables, m.seq_lens, 0.125, max_threads=1)
    assert kernel._pool is None
    split = kernel(b.q, cache, m.block_tables, m.seq_lens, 0.125, max_threads=3)
    assert kernel._pool is not None
    assert torch.equal(whole, split)
    for i in (0, 4, 8):
        alone = kernel(b.q[i : i + 1], cache, m.block_tables[i : i + 1], m.seq_lens[i : i + 1], 0.125)
        assert torch.equal(alone[0], whole[i])


def test_native_decode_splits_rows_only_over_enough_cached_tokens():
    """Rows go to other threads only when every thread reads MIN_KEYS_PER_THREAD cached tokens:
    short contexts stay on the calling thread whatever the thread budget."""
    if cpu_native.decode_kernel() is None:
        pytest.skip("no native kernel here")
    kernel = cpu_native.DecodeKernel(cpu_native.library())
    b = _decode_batch(9, 8, 2, 64, seed=4)
    m = b.meta
    assert int(m.seq_lens.sum()) < 2 * kernel.MIN_KEYS_PER_THREAD
    short = kernel(b.q, b.kv_cache, m.block_tables, m.seq_lens, 0.125, max_threads=4)
    assert kernel._pool is None
    long_rows = _decode_batch(8, 8, 2, 64, seed=5, min_len=1100, max_len=1200)
    lm = long_rows.meta
    assert int(lm.seq_lens.sum()) >= 2 * kernel.MIN_KEYS_PER_THREAD
    kernel(long_rows.q, long_rows.kv_cache, lm.block_tables, lm.seq_lens, 0.125, max_threads=2)
    assert kernel._pool is not None
    assert torch.equal(short, kernel(b.q, b.kv_cache, m.block_tables, m.seq_lens, 0.125, max_threads=1))


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (4, 2), (6, 3)])
@pytest.mark.parametrize("slice_rows", [1, 5, 16])
def test_prompt_chunks_in_query_slices_match_reference(block_size, num_q_heads, num_kv_heads, slice_rows,
                                                       monkeypatch):
    """Prompt chunks after cached context run in slices of PREFILL_Q_CHUNK query rows, each against
    the keys up to its last row: chunks of one slice, several, and a partial last slice, with and
    without a prefix hit, next to whole prompts of unequal lengths (one SDPA call each)."""
    monkeypatch.setattr(cpu_backend, "PREFILL_Q_CHUNK", slice_rows)
    ctx = [0, 3 * block_size + 2, 0, 2 * block_size, 1, 0]
    q = [37, 2 * slice_rows + 3, 5, slice_rows, 4 * slice_rows, 2]
    b = make_paged_batch(ctx, q, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=32,
                         block_size=block_size, seed=slice_rows, pad_tokens=3)
    _share_prefix(b, 1, 3, 2)
    out, ref = _both(b, scale=32 ** -0.5)
    real = sum(q)
    torch.testing.assert_close(out[:real], ref[:real], atol=ATOL[torch.float32], rtol=0,
                               msg=lambda m: f"ctx={ctx} q={q}: {m}")


def test_long_prompts_and_chunks_past_one_query_slice_match_reference():
    """The benchmark's shapes: whole prompts of hundreds of tokens beside a chunk of more than
    PREFILL_Q_CHUNK rows after cached context (the default slice size)."""
    n = cpu_backend.PREFILL_Q_CHUNK
    b = make_paged_batch([0, 0, 133, 1], [300, 41, n + 70, 1], num_q_heads=4, num_kv_heads=2, head_dim=64,
                         block_size=16, seed=7)
    out, ref = _both(b, scale=0.125)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)
