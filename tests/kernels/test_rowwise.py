"""tidal.kernels.rowwise: fixed-order reductions over the vocabulary, one program per row."""
from __future__ import annotations

import random

import torch

from tidal.kernels.rowwise import BLOCK, row_logsumexp, row_softmax_cumsum

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VOCAB = 2 * BLOCK + 300   # three slices, the last one partial


def _logits(rows: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    x[:, ::7] = float("-inf")   # filtered tokens, as top-k / min-p leave them
    return x.to(DEVICE)


def test_close_to_torch():
    x = _logits(5, 0)
    x[2] = float("-inf")
    lse = row_logsumexp(x)
    ref = torch.logsumexp(x.double(), dim=-1)
    assert lse[2] == float("-inf")
    keep = torch.tensor([0, 1, 3, 4], device=DEVICE)
    assert (lse[keep].double() - ref[keep]).abs().max() < 1e-5
    cum = row_softmax_cumsum(x[keep])
    assert (cum.double() - x[keep].double().softmax(-1).cumsum(-1)).abs().max() < 1e-5
    assert torch.all(cum[:, -1] > 1 - 1e-5)


def test_a_rows_bits_do_not_depend_on_the_batch():
    rng = random.Random(1)
    target = _logits(1, 2)
    alone = row_logsumexp(target)[0], row_softmax_cumsum(target)[0]
    for rows in (2, 5, rng.randrange(6, 40)):
        x = _logits(rows, rows)
        pos = rng.randrange(rows)
        x[pos] = target[0]
        assert torch.equal(row_logsumexp(x)[pos], alone[0]), rows
        assert torch.equal(row_softmax_cumsum(x)[pos], alone[1]), rows
    # A strided row (a view into wider logits) gives the same bits.
    wide = torch.zeros(3, VOCAB + 5, device=DEVICE)
    wide[1, :VOCAB] = target[0]
    assert torch.equal(row_logsumexp(wide[:, :VOCAB])[1], alone[0])
