"""The sampler's batch-invariant path (Sampler(batch_invariant=True), what the engine runs on CUDA
in batch-invariant mode; here through Triton's interpreter): a row's token, logprob, rank and top
logprobs are bitwise the same alone and inside random batches, and close to the torch path."""
from __future__ import annotations

import random

import torch

from tidal.runner.sampler import Sampler, SamplingTensors
from tidal.sampling_params import SamplingParams as SP

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VOCAB = 1500
TARGETS = [SP(temperature=0, logprobs=3), SP(temperature=0.8, top_p=0.9, seed=5, logprobs=2),
           SP(temperature=1.2, top_p=0.7, top_k=50, seed=6, logprobs=0, logprobs_mode="processed"),
           SP(temperature=1.0, min_p=0.02, top_p=0.95, seed=7, logprobs=1, logprobs_mode="processed")]


def _sample(sampler: Sampler, logits: torch.Tensor, params: list[SP]):
    t = SamplingTensors.build(params, [p.seed or 0 for p in params], [3] * len(params), logits.device)
    out = sampler(logits, t)
    return out.token_ids, out.logprobs, out.ranks, out.top_token_ids, out.top_logprobs


def _row(out, i: int, k: int) -> list[torch.Tensor]:
    """Row i's results, with its own k top logprobs (a batch lists as many as its largest k)."""
    ids, lps, ranks, top_ids, top_lps = out
    if top_ids is None:
        top_ids, top_lps = ids[:, None][:, :0], lps[:, None][:, :0]
    return [ids[i], lps[i], ranks[i], top_ids[i, :k], top_lps[i, :k]]


def test_rows_are_bitwise_invariant_and_close_to_torch():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    invariant, reference = Sampler(batch_invariant=True), Sampler()
    for p in TARGETS:
        target = (torch.randn(1, VOCAB, generator=gen) * 4).to(DEVICE)
        alone = _row(_sample(invariant, target, [p]), 0, p.logprobs)
        ref = _row(_sample(reference, target, [p]), 0, p.logprobs)
        assert torch.equal(alone[0], ref[0]) and torch.equal(alone[2], ref[2]) and torch.equal(alone[3], ref[3])
        assert (alone[1] - ref[1]).abs() < 1e-5 and torch.allclose(alone[4], ref[4], atol=1e-5, rtol=0)
        for rows in (3, rng.randrange(4, 24)):
            logits = (torch.randn(rows, VOCAB, generator=gen) * 4).to(DEVICE)
            pos = rng.randrange(rows)
            logits[pos] = target[0]
            params = [SP(temperature=rng.choice([0, 1.0]), top_p=rng.choice([1.0, 0.8]), seed=i, logprobs=3)
                      for i in range(rows)]
            params[pos] = p
            got = _row(_sample(invariant, logits, params), pos, p.logprobs)
            assert all(torch.equal(g, a) for g, a in zip(got, alone)), (p, rows, pos)
