"""The CUDA batch-invariant attention backend (Triton kernels; the interpreter on the CPU): a target
sequence's outputs are bitwise the same computed as a whole prompt, in chunks, as decode rows
after a prefix-cache hit, among random other sequences at random places, with and without the
padding rows of a captured decode step."""
from __future__ import annotations

import random

import pytest
import torch

from tests.attention.paged_batch import DEVICE, rel_err
from tidal.attention.base import AttentionMetadata, store_kv
from tidal.attention.cuda import CudaInvariantAttentionBackend
from tidal.attention.torch_ref import paged_attention_ref

HQ, HKV, D, BS, NB, SCALE = 4, 2, 32, 16, 64, 0.2
# (query heads, kv heads): GQA groups of 2 (the kernel's default case), 1, 3 (padded to 4) and 8.
HEADS = [(4, 2), (2, 2), (6, 2), (16, 2)]
INVARIANCE_HEADS = [(4, 2), (6, 2)]   # the bitwise scenarios: one full and one padded group
PROMPT = 70
TARGET_BLOCKS = [5, 41, 12, 30, 7]   # ceil(70 / 16) blocks of the pool (the first 2 with 64-token blocks)


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE)


class _Scenario:
    def __init__(self, seed: int, heads: tuple[int, int] = (HQ, HKV), block_size: int = BS) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.gen = gen
        self.rng = random.Random(seed)
        self.hq, self.hkv = heads
        self.bs = block_size
        self.target = TARGET_BLOCKS[:-(-PROMPT // block_size)]
        self.q, self.k, self.v = (_rand(gen, PROMPT, self.hq, D), _rand(gen, PROMPT, self.hkv, D),
                                  _rand(gen, PROMPT, self.hkv, D))
        self.cache = _rand(gen, 2, NB, block_size, self.hkv, D)   # garbage everywhere that is not written
        self.backend = CudaInvariantAttentionBackend()

    def step(self, a: int, b: int, others: int, pad: int = 0) -> torch.Tensor:
        """Positions a..b-1 of the target (keys 0..a-1 already cached) in one step with `others`
        random sequences and `pad` graph-padding rows (seq_len 0, slot -1); the target's rows."""
        free = [blk for blk in range(NB) if blk not in self.target]
        self.rng.shuffle(free)
        seqs = []   # (ctx, q_len, table)
        for _ in range(others):
            ctx, n = self.rng.randrange(0, 40), self.rng.choice([1, 1, self.rng.randrange(1, 30)])
            need = -(-(ctx + n) // self.bs)
            seqs.append((ctx, n, free[:need], None))
            free = free[need:]
        at = self.rng.randrange(others + 1)
        seqs.insert(at, (a, b - a, self.target, (self.q[a:b], self.k[a:b], self.v[a:b])))
        width = max(len(t) for _, _, t, _ in seqs) + 1
        qs, ks, vs, slots, tables = [], [], [], [], torch.zeros(len(seqs) + pad, width, dtype=torch.int32)
        for i, (ctx, n, table, qkv) in enumerate(seqs):
            tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
            q, k, v = qkv or (_rand(self.gen, n, self.hq, D), _rand(self.gen, n, self.hkv, D),
                              _rand(self.gen, n, self.hkv, D))
            qs.append(q), ks.append(k), vs.append(v)
            slots += [table[p // self.bs] * self.bs + p % self.bs for p in range(ctx, ctx + n)]
        q_lens = [n for _, n, _, _ in seqs] + [1] * pad
        seq_lens = [c + n for c, n, _, _ in seqs] + [0] * pad
        slots += [-1] * pad
        for _ in range(pad):
            qs.append(_rand(self.gen, 1, self.hq, D)), ks.append(_rand(self.gen, 1, self.hkv, D))
            vs.append(_rand(self.gen, 1, self.hkv, D))
        qsl = [0]
        for n in q_lens:
            qsl.append(qsl[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_tables=tables.to(DEVICE),
            max_query_len=max(q_lens), max_seq_len=max(seq_lens), query_lens_cpu=q_lens, seq_lens_cpu=seq_lens)
        out = self.backend.forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), self.cache, meta, SCALE)
        return out[qsl[at]:qsl[at + 1]]


def _whole(heads: tuple[int, int] = (HQ, HKV), block_size: int = BS) -> torch.Tensor:
    s = _Scenario(0, heads, block_size)
    return s.step(0, PROMPT, others=0)


@pytest.mark.parametrize("heads", HEADS)
def test_whole_prompt_matches_the_torch_reference(heads):
    s = _Scenario(0, heads)
    got = s.step(0, PROMPT, others=2)
    table = torch.tensor([TARGET_BLOCKS], dtype=torch.int32, device=DEVICE)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.int64, device=DEVICE),
                             query_start_loc=torch.tensor([0, PROMPT], dtype=torch.int32, device=DEVICE),
                             seq_lens=torch.tensor([PROMPT], dtype=torch.int32, device=DEVICE), block_tables=table,
                             max_query_len=PROMPT, max_seq_len=PROMPT, query_lens_cpu=[PROMPT],
                             seq_lens_cpu=[PROMPT])
    assert rel_err(got, paged_attention_ref(s.q, s.cache, meta, SCALE)) < 1e-5
    assert torch.equal(got, _whole(heads))


@pytest.mark.parametrize("heads,block_size", [(h, BS) for h in INVARIANCE_HEADS] + [((4, 2), 64)])
def test_chunked_prefill_in_random_batches_is_bitwise_the_whole_prompt(heads, block_size):
    """(block_size 64: a key step lies inside one cache block, the kernel's other lookup path.)"""
    whole = _whole(heads, block_size)
    assert rel_err(whole, _whole(heads)) < 1e-5   # the same keys, only paged differently
    s = _Scenario(0, heads, block_size)
    for a, b, others in [(0, 23, 3), (23, 40, 0), (40, 41, 5), (41, PROMPT, 2)]:
        assert torch.equal(s.step(a, b, others), whole[a:b]), (a, b)


@pytest.mark.parametrize("heads", INVARIANCE_HEADS)
def test_decode_rows_after_a_prefix_hit_are_bitwise_the_whole_prompt(heads):
    whole = _whole(heads)
    s = _Scenario(0, heads)
    # The first 48 positions' K/V were written by an earlier request (a prefix-cache hit).
    slots = torch.tensor([TARGET_BLOCKS[p // BS] * BS + p % BS for p in range(48)], device=DEVICE)
    store_kv(s.k[:48], s.v[:48], s.cache, slots)
    assert torch.equal(s.step(48, 60, others=1), whole[48:60])
    for p in range(60, PROMPT):   # then one token per step, as decode rows; some steps padded
        got = s.step(p, p + 1, others=s.rng.randrange(4), pad=2 if p % 2 else 0)
        assert torch.equal(got, whole[p:p + 1]), p


def test_engine_config_takes_batch_invariant_on_cuda(monkeypatch):
    from tidal.config import EngineConfig
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # the config check only; no kernel runs
    assert EngineConfig(device="cuda", batch_invariant=True).attention_backend == "invariant"
    assert EngineConfig(device="cuda", batch_invariant=True, fused_kernels="on").dtype == "bfloat16"
    with pytest.raises(ValueError, match="EngineConfig.fused_kernels='off'"):
        EngineConfig(device="cuda", batch_invariant=True, fused_kernels="off")
    with pytest.raises(ValueError, match="EngineConfig.attention_backend='cuda'"):
        EngineConfig(device="cuda", batch_invariant=True, attention_backend="cuda")
