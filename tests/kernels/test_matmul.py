"""tidal.kernels.matmul: the batch-invariant linear layer's kernel (Triton's interpreter on the CPU)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tidal.kernels.matmul import CONFIGS, matmul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
K, N = 80, 72   # neither a multiple of BLOCK_K nor of BLOCK_N: the masked tails are exercised


def _weights(dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen).to(dtype).to(DEVICE)
    b = torch.randn(N, generator=gen).to(dtype).to(DEVICE) if bias else None
    return w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_is_close_to_f_linear(dtype, bias):
    w, b = _weights(dtype, bias)
    x = torch.randn(70, K).to(dtype).to(DEVICE)
    got = matmul(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == dtype and got.shape == (70, N)
    # float32: accumulation order only; bf16: the output's rounding (8 mantissa bits).
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((got.double() - ref).abs() / (ref.abs() + 1)).max() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_bits_do_not_depend_on_the_batch(dtype):
    """A row alone (M = 1) and inside batches of random M (1..64 and past one tile), among random
    other rows: bitwise equal. The row sits at the same offset in its BLOCK_M tile each time:
    the interpreter's tl.dot is numpy's BLAS, whose result depends on a row's place inside a
    matrix (the GPU's MMA does not; tests/runner/test_numerics_invariance_gpu.py checks any place)."""
    rng = random.Random(0)
    bm = CONFIGS[dtype].block_m
    w, b = _weights(dtype, True, seed=1)
    target = torch.randn(1, K).to(dtype).to(DEVICE)
    alone = matmul(target, w, b)[0]
    for m in [1, 2, 3, 17, 63, 64] + [rng.randrange(1, 65) for _ in range(4)] + [65, 130, rng.randrange(129, 200)]:
        pos = rng.randrange(0, m, bm)   # tile starts: 0, 64, 128, ...
        x = torch.randn(m, K).to(dtype).to(DEVICE)
        x[pos] = target[0]
        assert torch.equal(matmul(x, w, b)[pos], alone), (m, pos)
    # Any offset inside the tile: equal across batch sizes and neighbours for that offset.
    for _ in range(4):
        offset = rng.randrange(bm)
        rows = []
        for tile in (0, 1, 2):
            m = tile * bm + offset + 1 + rng.randrange(bm)
            x = torch.randn(m, K).to(dtype).to(DEVICE)
            x[tile * bm + offset] = target[0]
            rows.append(matmul(x, w, b)[tile * bm + offset])
        assert all(torch.equal(r, rows[0]) for r in rows), offset


def test_matmul_rejects_bad_shapes_and_dtypes():
    w, b = _weights(torch.float32, True)
    with pytest.raises(ValueError, match="x.shape"):
        matmul(torch.randn(3, K + 1, device=DEVICE), w)
    with pytest.raises(ValueError, match="x.dtype"):
        matmul(torch.randn(3, K, device=DEVICE).to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="b.shape"):
        matmul(torch.randn(3, K, device=DEVICE), w, b[:-1])
    assert matmul(torch.randn(0, K, device=DEVICE), w, b).shape == (0, N)
