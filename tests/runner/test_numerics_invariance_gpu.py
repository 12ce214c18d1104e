"""Batch-invariant mode on CUDA (EngineConfig.batch_invariant, device="cuda"): the engine-level
scenarios of test_numerics_invariance.py (alone vs random batches of 1-64 at random positions,
chunked prefill on/off, prefix-cache hits on/off, preemption by recompute) in bfloat16 and float32
with CUDA graphs on, plus the kernels' invariance at any row position (the interpreter can only
check tile-aligned positions for the matmul)."""
from __future__ import annotations

import random

import pytest
import torch

from tests.runner import test_numerics_invariance as cpu
from tests.runner.test_numerics_invariance import _run, _targets, path  # noqa: F401 (path: a fixture)
from tidal.kernels.matmul import matmul
from tidal.kernels.rowwise import row_logsumexp, row_softmax_cumsum

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DTYPES = ["bfloat16", "float32"]


@pytest.fixture
def make_cuda_llm(make_llm, request):
    """make_llm of the CPU module with device="cuda" and the test's dtype (graphs on by default)."""
    dtype = request.node.callspec.params["dtype"]

    def make(model_path: str, **kw):
        return make_llm(model_path, **({"device": "cuda", "dtype": dtype} | kw))
    return make


make_llm = cpu.make_llm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunked,prefix_caching", [(False, False), (True, False), (False, True), (True, True)])
def test_outputs_are_bitwise_identical_alone_and_in_random_batches_on_cuda(path, make_cuda_llm, dtype, chunked,  # noqa: F811
                                                                          prefix_caching):
    cpu.test_outputs_are_bitwise_identical_alone_and_in_random_batches(path, make_cuda_llm, chunked, prefix_caching)


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_survive_preemption_by_recompute_bitwise_on_cuda(path, make_cuda_llm, dtype):  # noqa: F811
    cpu.test_outputs_survive_preemption_by_recompute_bitwise(path, make_cuda_llm)


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_decode_runs_in_cuda_graphs_with_the_same_bits_as_eager(path, make_cuda_llm, dtype):  # noqa: F811
    targets = _targets(random.Random(3), 4)
    graphed = make_cuda_llm(path, lm_head_dtype="float32")
    runner = graphed.engine.core.runner
    assert runner.graphs is not None and runner.backend.batch_invariant and runner.sampler.batch_invariant
    eager = make_cuda_llm(path, lm_head_dtype="float32", enforce_eager=True)
    assert eager.engine.core.runner.graphs is None
    assert _run(graphed, targets) == _run(eager, targets)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matmul_rows_are_bitwise_invariant_at_any_position(dtype):
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 320, generator=gen).to(dtype).cuda()
    b = torch.randn(1000, generator=gen).to(dtype).cuda()
    target = torch.randn(1, 320, generator=gen).to(dtype).cuda()
    alone = matmul(target, w, b)[0]
    ref = torch.nn.functional.linear(target.double(), w.double(), b.double())[0]
    assert ((alone.double() - ref).abs() / (ref.abs() + 1)).max() < (1e-4 if dtype == torch.float32 else 2e-2)
    for m in [rng.randrange(1, 65) for _ in range(12)] + [100, 256, 1000]:
        x = torch.randn(m, 320, device="cuda").to(dtype)
        pos = rng.randrange(m)
        x[pos] = target[0]
        assert torch.equal(matmul(x, w, b)[pos], alone), (m, pos)


def test_vocab_reductions_are_bitwise_invariant_on_cuda():
    rng = random.Random(1)
    target = torch.randn(1, 151936, device="cuda") * 4
    alone = row_logsumexp(target)[0], row_softmax_cumsum(target)[0]
    assert (alone[0] - torch.logsumexp(target[0].double(), 0)).abs() < 1e-4
    for rows in (2, 7, 64, 256):
        x = torch.randn(rows, 151936, device="cuda") * 4
        pos = rng.randrange(rows)
        x[pos] = target[0]
        assert torch.equal(row_logsumexp(x)[pos], alone[0]), rows
        assert torch.equal(row_softmax_cumsum(x)[pos], alone[1]), rows
