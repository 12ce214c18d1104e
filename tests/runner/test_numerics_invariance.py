"""Batch-invariant mode (EngineConfig.batch_invariant) on the CPU: a request's tokens and logprobs
are bitwise identical (==) alone and inside random batches of 1-64 requests at random positions,
with chunked prefill on and off and with and without prefix-cache hits."""
from __future__ import annotations

import random

import pytest
import torch

from tidal import LLM, SamplingParams
from tidal.attention.base import AttentionMetadata
from tidal.attention.invariant import invariant_attention
from tidal.attention.torch_ref import paged_attention_ref
from tidal.models.layers import Linear, set_batch_invariant

VOCAB = 256  # prompt tokens: plain bytes


@pytest.fixture(scope="module")
def path(tiny_ckpt):
    return tiny_ckpt("qwen3")


@pytest.fixture
def make_llm():
    made: list[LLM] = []

    def make(path: str, **kw) -> LLM:
        kw = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=2048, batch_invariant=True) | kw
        made.append(LLM(path, **kw))
        return made[-1]

    yield make
    for llm in made:
        llm.shutdown()


def _targets(rng: random.Random, count: int) -> list[tuple[list[int], SamplingParams]]:
    out = []
    for i in range(count):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(10, 40))]
        if i % 3 == 0:
            p = SamplingParams(max_tokens=6, temperature=0, logprobs=2, ignore_eos=True)
        else:
            p = SamplingParams(max_tokens=6, temperature=rng.choice([0.7, 1.0, 1.3]), top_p=rng.choice([1.0, 0.9]),
                               top_k=rng.choice([-1, 20]), min_p=rng.choice([0.0, 0.05]), seed=rng.randrange(2**31),
                               logprobs=1, ignore_eos=True, logprobs_mode=rng.choice(["raw", "processed"]))
        out.append((prompt, p))
    return out


def _fillers(rng: random.Random, count: int, prefix: list[int]) -> list[tuple[list[int], SamplingParams]]:
    """Other requests; some share the target's prompt prefix (prefix-cache hits when caching)."""
    out = []
    for _ in range(count):
        tail = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))]
        prompt = prefix[:rng.randrange(len(prefix) + 1)] + tail if rng.random() < 0.3 else tail
        out.append((prompt, SamplingParams(max_tokens=rng.randrange(1, 9), temperature=rng.choice([0.0, 1.0]),
                                           seed=rng.randrange(2**31), ignore_eos=True)))
    return out


def _result(out) -> tuple[list[int], list[float], list[dict[int, float]]]:
    c = out.outputs[0]
    return c.token_ids, c.token_logprobs, c.top_logprobs


def _run(llm: LLM, reqs: list[tuple[list[int], SamplingParams]]):
    return [_result(o) for o in llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)]


@pytest.mark.parametrize("chunked,prefix_caching", [(False, False), (True, False), (False, True), (True, True)])
def test_outputs_are_bitwise_identical_alone_and_in_random_batches(path, make_llm, chunked, prefix_caching):
    rng = random.Random(1000 + 2 * chunked + prefix_caching)
    targets = _targets(rng, 3)
    alone_llm = make_llm(path, enable_prefix_caching=False, max_num_batched_tokens=4096)
    alone = [_run(alone_llm, [t])[0] for t in targets]

    llm = make_llm(path, enable_prefix_caching=prefix_caching, max_num_seqs=64,
                   max_num_batched_tokens=7 if chunked else 4096)
    blocks = llm.engine.core.block_manager
    sizes = [1, 64, rng.randrange(2, 64)]
    for target, expected, size in zip(targets, alone, sizes):
        hits = blocks.prefix_hits
        if prefix_caching:  # the target's own prompt blocks, cached by an earlier request
            _run(llm, [(target[0][: len(target[0]) - 2] + [7], SamplingParams(max_tokens=1))])
        batch = _fillers(rng, size - 1, target[0])
        pos = rng.randrange(size)
        batch.insert(pos, target)
        got = _run(llm, batch)[pos]
        assert got == expected, f"batch of {size}, target at {pos}: {got} != {expected}"
        assert (blocks.prefix_hits > hits) == prefix_caching


def test_linear_rows_do_not_depend_on_the_number_of_rows():
    torch.manual_seed(0)
    lin = Linear(64, 272, True, torch.float32)
    lin.weight.normal_()
    lin.bias.normal_()
    set_batch_invariant(lin, True)
    x0 = torch.randn(64)
    rows = []
    for m in list(range(1, 40)) + [63, 64, 65, 200]:
        x = torch.randn(m, 64)
        pos = (7 * m) % m
        x[pos] = x0
        rows.append(lin(x)[pos])
    assert all(torch.equal(r, rows[0]) for r in rows)


def _meta(ctx: int, q_len: int, table: torch.Tensor) -> AttentionMetadata:
    return AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.int64),
                             query_start_loc=torch.tensor([0, q_len], dtype=torch.int32),
                             seq_lens=torch.tensor([ctx + q_len], dtype=torch.int32), block_tables=table[None],
                             max_query_len=q_len, max_seq_len=ctx + q_len, query_lens_cpu=[q_len],
                             seq_lens_cpu=[ctx + q_len])


@pytest.mark.parametrize("seq_len", [5, 64, 131])
def test_attention_of_a_query_is_the_same_in_decode_chunks_and_whole_prompts(seq_len):
    torch.manual_seed(seq_len)
    block_size, heads, kv_heads, dim = 4, 4, 2, 16
    blocks = -(-seq_len // block_size)
    kv_cache = torch.randn(2, blocks + 3, block_size, kv_heads, dim)
    table = torch.randperm(blocks + 3)[:blocks].to(torch.int32)
    q = torch.randn(seq_len, heads, dim)
    whole = invariant_attention(q, kv_cache, _meta(0, seq_len, table), 0.25)
    ref = paged_attention_ref(q, kv_cache, _meta(0, seq_len, table), 0.25)
    assert (whole - ref).abs().max() < 1e-5
    for ctx in sorted({1, seq_len // 3, seq_len // 2, seq_len - 1}):
        for end in sorted({ctx + 1, (ctx + seq_len + 1) // 2, seq_len}):
            part = invariant_attention(q[ctx:end], kv_cache, _meta(ctx, end - ctx, table), 0.25)
            assert torch.equal(part, whole[ctx:end]), (ctx, end)


def test_outputs_survive_preemption_by_recompute_bitwise(path, make_llm):
    rng = random.Random(7)
    targets = _targets(rng, 2)
    alone_llm = make_llm(path, enable_prefix_caching=False)
    alone = [_run(alone_llm, [t])[0] for t in targets]
    # 30 blocks of 4 tokens, 12 requests growing to ~40 tokens each: requests get preempted.
    llm = make_llm(path, num_kv_blocks=30, enable_prefix_caching=False, max_num_batched_tokens=64)
    batch = [([rng.randrange(VOCAB) for _ in range(8)], SamplingParams(max_tokens=32, seed=i, ignore_eos=True))
             for i in range(10)]
    batch[3:3] = [targets[0]]
    batch[8:8] = [targets[1]]
    got = _run(llm, batch)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert [got[3], got[8]] == alone
