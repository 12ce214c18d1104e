"""Sampler: greedy, temperature, top-k, top-p, min-p, seeds, logprobs, bans.

The noise is a hash of (seed, step, token id), so every statistical test here is deterministic:
it either always passes or always fails for a given implementation.
"""
from __future__ import annotations

import math

import pytest
import torch

from tidal.runner.sampler import (Sampler, SamplingTensors, apply_token_bans, log_exponentials,
                                  log_exponentials_from_bits, mix32, random_bits, row_keys,
                                  token_codes)
from tidal.sampling_params import SamplingParams as SP


def sample(logits: torch.Tensor, params: list[SP], seeds: list[int] | None = None,
           steps: list[int] | None = None, sampler: Sampler | None = None):
    b = logits.shape[0]
    seeds = list(range(1000, 1000 + b)) if seeds is None else seeds
    steps = [0] * b if steps is None else steps
    t = SamplingTensors.build(params, seeds, steps, logits.device)
    return (sampler or Sampler())(logits, t)


def kept_probs(row: torch.Tensor, p: SP) -> dict[int, float]:
    """Reference, one row, float64: the tokens that may be sampled and their probabilities."""
    x = row.double() / p.temperature
    vocab = x.numel()
    order = sorted(range(vocab), key=lambda i: (-x[i].item(), i))
    keep = set(range(vocab))
    if 0 < p.top_k < vocab:
        kth = x[order[p.top_k - 1]].item()
        keep = {i for i in keep if x[i].item() >= kth}
    probs = torch.softmax(torch.where(torch.tensor([i in keep for i in range(vocab)]), x,
                                      torch.tensor(-math.inf, dtype=torch.float64)), 0)
    if p.top_p < 1.0:
        cum, prefix = 0.0, set()
        for i in order:
            if i not in keep:
                continue
            prefix.add(i)
            cum += probs[i].item()
            if cum >= p.top_p:
                break
        keep = prefix
    if p.min_p > 0:
        pmax = probs.max().item()
        keep = {i for i in keep if probs[i].item() >= p.min_p * pmax}
    total = sum(probs[i].item() for i in keep)
    return {i: probs[i].item() / total for i in sorted(keep)}


def assert_distribution(tokens: torch.Tensor, expected: dict[int, float]) -> None:
    """Nothing outside the support; a chi-square statistic well inside its null spread."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=max(expected) + 1).double()
    outside = [i for i in range(counts.numel()) if counts[i] > 0 and i not in expected]
    assert not outside, f"sampled tokens outside the support: {outside}"
    chi2 = sum((counts[i].item() - n * q) ** 2 / (n * q) for i, q in expected.items())
    df = max(len(expected) - 1, 1)
    assert chi2 < df + 6 * math.sqrt(2 * df), f"chi2={chi2:.1f} for df={df}: {counts.tolist()}"


def many_rows(logits_row: torch.Tensor, n: int) -> torch.Tensor:
    return logits_row[None, :].expand(n, -1).contiguous()


# --- greedy -------------------------------------------------------------------------------------

def test_greedy_is_argmax_with_lowest_id_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(64, 100)
    logits[3, [7, 42]] = 100.0  # a tie
    out = sample(logits, [SP(temperature=0.0)] * 64)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids[3].item() == 7


def test_greedy_rows_in_a_mixed_batch_take_argmax():
    torch.manual_seed(1)
    logits = torch.randn(32, 50)
    params = [SP(temperature=0.0) if i % 2 else SP(temperature=1.5, top_p=0.9) for i in range(32)]
    out = sample(logits, params)
    assert torch.equal(out.token_ids[1::2], logits[1::2].argmax(-1))


def test_tiny_temperature_counts_as_greedy():
    logits = torch.tensor([[0.0, 1.0, 0.5]])
    t = SamplingTensors.build([SP(temperature=1e-6)], [1], [0], "cpu")
    assert t.all_greedy and t.temperature.item() == 0.0
    assert Sampler()(logits, t).token_ids.item() == 1


# --- distributions ------------------------------------------------------------------------------

ROW = torch.tensor([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0])


@pytest.mark.parametrize("p", [
    SP(temperature=1.0),
    SP(temperature=0.6),
    SP(temperature=2.0),
    SP(top_k=3),
    SP(top_p=0.7),
    SP(top_p=0.95, temperature=1.3),
    SP(min_p=0.2),
    SP(top_k=5, top_p=0.8, min_p=0.1, temperature=0.9),
], ids=repr)
def test_distribution_over_seeds_matches_reference(p):
    n = 40_000
    out = sample(many_rows(ROW, n), [p] * n, seeds=list(range(n)))
    assert_distribution(out.token_ids, kept_probs(ROW, p))


def test_distribution_over_steps_matches_softmax():
    """One seed, many steps: the draws along a sequence are independent too."""
    n = 40_000
    out = sample(many_rows(ROW, n), [SP()] * n, seeds=[7] * n, steps=list(range(n)))
    assert_distribution(out.token_ids, kept_probs(ROW, SP()))


def test_low_probability_tokens_are_sampled_at_their_rate():
    """A token at probability 1e-3 next to a dominant one (tests the noise tail)."""
    row = torch.tensor([0.0, math.log(1e-3 / (1 - 1e-3))])
    n = 200_000
    out = sample(many_rows(row, n), [SP()] * n, seeds=list(range(n)))
    rate = out.token_ids.float().mean().item()
    assert abs(rate - 1e-3) < 5 * math.sqrt(1e-3 / n)


def test_large_vocab_distribution():
    torch.manual_seed(2)
    row = torch.randn(5000) * 2
    n = 20_000
    out = sample(many_rows(row, n), [SP(top_k=20)] * n, seeds=list(range(n)))
    assert_distribution(out.token_ids, kept_probs(row, SP(top_k=20)))


# --- filters exclude what they must -------------------------------------------------------------

def test_top_k_keeps_ties_at_the_kth_value():
    row = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0, -1.0])
    n = 3000
    out = sample(many_rows(row, n), [SP(top_k=2)] * n, seeds=list(range(n)))
    assert set(out.token_ids.tolist()) == {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_prefix_and_always_the_top_token():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    row = probs.log()
    n = 3000
    out = sample(many_rows(row, n), [SP(top_p=0.65)] * n, seeds=list(range(n)))
    assert set(out.token_ids.tolist()) == {0, 1}
    out = sample(many_rows(row, n), [SP(top_p=0.01)] * n, seeds=list(range(n)))
    assert set(out.token_ids.tolist()) == {0}


def test_top_p_breaks_ties_by_token_id():
    row = torch.zeros(4)  # four tokens at 0.25: top_p=0.5 keeps the two lowest ids
    n = 2000
    out = sample(many_rows(row, n), [SP(top_p=0.5)] * n, seeds=list(range(n)))
    assert set(out.token_ids.tolist()) == {0, 1}


def test_min_p_drops_tokens_below_the_scaled_max():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    n = 3000
    out = sample(many_rows(probs.log(), n), [SP(min_p=0.2)] * n, seeds=list(range(n)))
    assert set(out.token_ids.tolist()) == {0, 1, 2}


def test_filters_compose_on_random_rows():
    torch.manual_seed(3)
    params = [SP(top_k=4, top_p=0.6), SP(top_p=0.3, temperature=0.5), SP(min_p=0.3, top_k=10),
              SP(top_k=1, temperature=3.0), SP(top_p=0.9, min_p=0.05, temperature=1.7)]
    for p in params:
        row = torch.randn(40) * 2
        n = 2000
        out = sample(many_rows(row, n), [p] * n, seeds=list(range(n)))
        support = kept_probs(row, p)
        assert set(out.token_ids.tolist()) <= set(support), p


def test_top_k_off_values():
    row = torch.randn(10)
    n = 4000
    for k in (-1, 0, 10, 1000):
        out = sample(many_rows(row, n), [SP(top_k=k)] * n, seeds=list(range(n)))
        assert_distribution(out.token_ids, kept_probs(row, SP()))


def test_banned_tokens_are_never_sampled():
    torch.manual_seed(4)
    logits = torch.randn(6, 20)
    logits[:, 5] = 50.0  # the "EOS" everyone would pick
    apply_token_bans(logits, torch.tensor([0, 1, 2, 3, 4, 5, 5]), torch.tensor([5, 5, 5, 5, 5, 5, 6]))
    assert torch.isinf(logits[:, 5]).all() and torch.isinf(logits[5, 6])
    params = [SP(temperature=0.0), SP(), SP(top_k=2), SP(top_p=0.5), SP(min_p=0.5), SP()]
    for seed in range(50):
        out = sample(logits, params, seeds=[seed] * 6)
        assert (out.token_ids != 5).all() and out.token_ids[5] != 6


# --- reproducibility ----------------------------------------------------------------------------

def test_row_token_is_independent_of_batch_composition():
    """The same (logits, params, seed, step) gives the same token in any batch, at any position,
    whichever code path the rest of the batch forces (sorted top-p, top-k, min-p, greedy)."""
    torch.manual_seed(5)
    vocab = 300
    probes = [(torch.randn(vocab) * 3, p, seed, step) for p, seed, step in [
        (SP(), 11, 0), (SP(temperature=0.7), 12, 5), (SP(top_k=7), 13, 1), (SP(top_p=0.8), 14, 2),
        (SP(min_p=0.1), 15, 3), (SP(top_k=20, top_p=0.9, min_p=0.02), 16, 9),
        (SP(temperature=0.0), 17, 0)]]
    fillers = [SP(), SP(top_p=0.5), SP(top_k=3), SP(min_p=0.2), SP(temperature=0.0),
               SP(top_k=vocab + 5)]
    sampler = Sampler()
    alone = [sample(row[None], [p], [s], [st], sampler).token_ids.item() for row, p, s, st in probes]
    gen = torch.Generator().manual_seed(6)
    for trial in range(20):
        size = int(torch.randint(len(probes), 3 * len(probes), (1,), generator=gen))
        rows = [probes[i % len(probes)] for i in range(len(probes))]
        rows += [(torch.randn(vocab, generator=gen), fillers[int(torch.randint(len(fillers), (1,),
                  generator=gen))], int(torch.randint(1 << 40, (1,), generator=gen)), trial)
                 for _ in range(size - len(probes))]
        perm = torch.randperm(size, generator=gen).tolist()
        batch = [rows[i] for i in perm]
        out = sample(torch.stack([r[0] for r in batch]), [r[1] for r in batch],
                     [r[2] for r in batch], [r[3] for r in batch], sampler)
        for pos, i in enumerate(perm):
            if i < len(probes):
                assert out.token_ids[pos].item() == alone[i], (trial, probes[i][1])


def test_same_seed_same_tokens_and_different_seeds_differ():
    row = torch.zeros(1000)
    n = 200
    a = sample(many_rows(row, n), [SP()] * n, seeds=list(range(n))).token_ids
    b = sample(many_rows(row, n), [SP()] * n, seeds=list(range(n))).token_ids
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > 150  # ~181 distinct expected from 200 draws over 1000
    steps = sample(many_rows(row, n), [SP()] * n, seeds=[3] * n, steps=list(range(n))).token_ids
    assert len(set(steps.tolist())) > 150


def test_huge_and_negative_seeds():
    t = SamplingTensors.build([SP()] * 3, [-1, 2**64 - 1, 2**70 + 5], [0, 0, 0], "cpu")
    assert t.seeds.tolist() == [-1, -1, 5]


# --- logprobs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [SP(logprobs=0), SP(logprobs=3, temperature=0.5, top_p=0.8),
                               SP(logprobs=5, temperature=0.0), SP(logprobs=2, min_p=0.3, top_k=4)])
def test_logprobs_are_log_softmax_of_raw_logits(p):
    torch.manual_seed(7)
    logits = torch.randn(16, 500) * 4
    out = sample(logits, [p] * 16)
    ref = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1), atol=1e-5)
    if p.logprobs:
        top_vals, top_ids = ref.topk(p.logprobs, dim=-1)
        assert torch.equal(out.top_token_ids, top_ids)
        assert torch.allclose(out.top_logprobs, top_vals, atol=1e-5)
    else:
        assert out.top_token_ids is None and out.top_logprobs is None


def test_no_logprobs_when_nobody_asks_and_max_k_when_some_do():
    logits = torch.randn(3, 30)
    out = sample(logits, [SP()] * 3)
    assert out.logprobs is None and out.top_logprobs is None
    out = sample(logits, [SP(), SP(logprobs=0), SP(logprobs=4)])
    assert out.logprobs.shape == (3,) and out.top_token_ids.shape == (3, 4)


def test_bf16_logits_are_accepted():
    logits = torch.randn(4, 64).bfloat16()
    out = sample(logits, [SP(logprobs=1)] * 4)
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32


# --- SamplingTensors.build ----------------------------------------------------------------------

def test_build_flags_and_greedy_rows_switch_filters_off():
    params = [SP(temperature=0.0, top_p=0.5, top_k=3, min_p=0.5, logprobs=2), SP(top_k=-1),
              SP(top_k=40, top_p=0.9)]
    t = SamplingTensors.build(params, [1, 2, 3], [0, 4, 9], "cpu")
    assert t.temperature.tolist() == [0.0, 1.0, 1.0]
    assert t.top_k.tolist() == [0, 0, 40] and t.max_top_k == 40
    assert t.top_p.tolist() == [1.0, 1.0, pytest.approx(0.9)]
    assert t.min_p.tolist() == [0.0, 0.0, 0.0]
    assert t.steps.tolist() == [0, 4, 9]
    assert (t.all_greedy, t.any_top_p, t.any_top_k, t.any_min_p) == (False, True, True, False)
    assert t.max_num_logprobs == 2
    assert t.temperature.dtype == torch.float32 and t.top_k.dtype == torch.int64


def test_build_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="seeds"):
        SamplingTensors.build([SP()] * 2, [1], [0, 0], "cpu")


def test_empty_batch():
    t = SamplingTensors.build([], [], [], "cpu")
    out = Sampler()(torch.zeros(0, 10), t)
    assert out.token_ids.shape == (0,)


# --- the hash -----------------------------------------------------------------------------------

GOLDEN_MIX32 = [0, 2261973619, 229111015, 2578835075, 956453899]
GOLDEN_KEYS = [3545292543, 1996235892, 1189596572, 3244045560]
GOLDEN_BITS = [[2029422135, 3499533484, 1586773444], [3416396074, 809802410, 2861506782],
               [1224500200, 2527575824, 4098272018], [2258262017, 1321644001, 3190142972]]


def mix32_python(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) % 2**32
    x ^= x >> 15
    x = (x * 0x735A2D97) % 2**32
    return x ^ (x >> 15)


def test_mix32_matches_plain_integer_arithmetic():
    xs = [0, 1, 2, 3, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 123456789, 0xDEADBEEF]
    assert mix32(torch.tensor(xs)).tolist() == [mix32_python(x) for x in xs]


def test_hash_golden_values():
    """Pins the noise: a change here changes every seeded sample (and CPU/GPU must agree)."""
    x = torch.tensor([0, 1, 2, 0xFFFFFFFF, 123456789])
    assert mix32(x).tolist() == GOLDEN_MIX32
    keys = row_keys(torch.tensor([0, 1, -1, 2**62]), torch.tensor([0, 0, 3, 2**31]))
    assert keys.tolist() == GOLDEN_KEYS
    assert random_bits(keys[:, None], token_codes(torch.arange(3))[None]).tolist() == GOLDEN_BITS


def test_mix32_is_a_bijection_on_a_range_and_stays_in_32_bits():
    x = torch.arange(1 << 20)
    h = mix32(x)
    assert h.min() >= 0 and h.max() < (1 << 32)
    assert torch.unique(h).numel() == x.numel()


def test_random_bits_are_uniform_and_uncorrelated_across_neighbouring_seeds():
    keys = row_keys(torch.arange(256), torch.zeros(256, dtype=torch.int64))[:, None]
    bits = random_bits(keys, token_codes(torch.arange(4096))[None])
    u = (bits.double() + 0.5) / 2**32
    hist = torch.histc(u.flatten(), bins=64, min=0, max=1)
    expected = u.numel() / 64
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    assert chi2 < 63 + 6 * math.sqrt(2 * 63)
    corr = torch.corrcoef(u[:8])  # seeds 0..7 over the same tokens
    assert (corr - torch.eye(8, dtype=torch.float64)).abs().max() < 0.06
    e = log_exponentials(keys, token_codes(torch.arange(4096))[None]).double().exp()
    assert abs(e.mean().item() - 1.0) < 0.01 and torch.isfinite(e).all() and (e > 0).all()


def test_exponentials_are_accurate_over_the_whole_range():
    """E = -log1p(-u) to float32 precision, including the tails that decide rare winners."""
    bits = torch.cat([torch.arange(0, 1 << 12), torch.randint(0, 1 << 32, (100_000,)),
                      (1 << 32) - 1 - torch.arange(0, 1 << 12)])
    got = log_exponentials_from_bits(bits).double()
    u32 = (bits.float() * 2**-32 + 2**-33).clamp(max=1 - 2**-24).double()  # u as float32 holds it
    assert (got - torch.log(-torch.log1p(-u32))).abs().max() < 1e-5
    u = (bits.double() + 0.5) / 2**32  # exact u: float32 rounding only matters near u = 1
    low = u < 0.5
    assert (got[low] - torch.log(-torch.log1p(-u[low]))).abs().max() < 1e-5
    assert -got[0].item() > 22.8  # the largest noise: u = 2**-33
    assert torch.isfinite(got).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("use_triton", [False, True])
def test_cuda_matches_cpu(use_triton):
    torch.manual_seed(8)
    b, vocab = 64, 32000
    logits = torch.randn(b, vocab) * 3
    params = [[SP(), SP(top_p=0.9), SP(top_k=50, min_p=0.05), SP(temperature=0.0, logprobs=3)][i % 4]
              for i in range(b)]
    seeds, steps = list(range(b)), [i * 3 for i in range(b)]
    cpu = sample(logits, params, seeds, steps, Sampler(use_triton=False))
    gpu = sample(logits.cuda(), params, seeds, steps, Sampler(use_triton=use_triton))
    keys = row_keys(torch.tensor(seeds), torch.tensor(steps))
    assert torch.equal(row_keys(torch.tensor(seeds).cuda(), torch.tensor(steps).cuda()).cpu(), keys)
    codes = token_codes(torch.arange(vocab))
    assert torch.equal(random_bits(keys.cuda()[:, None], codes.cuda()[None]).cpu(),
                       random_bits(keys[:, None], codes[None]))
    # Bit-equal noise; float log may differ in the last place between devices, so a winner
    # can in principle differ when two scores are within an ulp.
    assert (gpu.token_ids.cpu() == cpu.token_ids).float().mean() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_distribution_and_batch_invariance_with_triton():
    n = 40_000
    p = SP(top_k=5, top_p=0.8, min_p=0.1, temperature=0.9)
    out = sample(many_rows(ROW, n).cuda(), [p] * n, seeds=list(range(n)))
    assert_distribution(out.token_ids.cpu(), kept_probs(ROW, p))
    alone = sample(ROW[None].cuda(), [p], seeds=[123]).token_ids.item()
    mixed = sample(torch.randn(300, ROW.numel()).cuda().index_copy(0, torch.tensor([77]).cuda(),
                                                                  ROW[None].cuda()),
                   [SP(top_p=0.5)] * 77 + [p] + [SP()] * 222, seeds=list(range(77)) + [123] + [0] * 222)
    assert mixed.token_ids[77].item() == alone


_TRITON_CHECK = r"""
import torch
from tidal.runner.sampler import Sampler, SamplingTensors
from tidal.sampling_params import SamplingParams as SP
torch.manual_seed(0)
kinds = [SP(), SP(top_p=0.9), SP(top_k=50, min_p=0.05), SP(temperature=0.0), SP(min_p=0.1),
         SP(top_k=5, temperature=0.7)]
for b, vocab, ps in [(12, 3000, kinds), (9, 777, kinds[2:3] + kinds[4:]), (64, 40, [SP()]), (2, 5000, kinds[:3])]:
    logits = torch.randn(b, vocab) * 3
    params = [ps[i % len(ps)] for i in range(b)]
    seeds = [(-1) ** i * ((i << 40) + i) for i in range(b)]  # negative and 64-bit seeds too
    t = SamplingTensors.build(params, seeds, [i * 7 + (i << 33) for i in range(b)], "cpu")
    eager = Sampler(use_triton=False)(logits, t).token_ids
    fused = Sampler(use_triton=True)(logits, t).token_ids
    assert torch.equal(eager, fused), (b, vocab, (eager != fused).sum())
print("ok")
"""


def test_triton_race_matches_torch_in_the_interpreter():
    """The fused GPU kernel computes the same function as the torch path (Triton's CPU
    interpreter; it reads TRITON_INTERPRET when kernels are defined, hence a fresh process)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
