"""The CUDA batch-invariant path end to end on the CPU: the engine with the Triton pieces the mode
runs on a GPU (tidal.kernels.matmul for every Linear, the invariant attention kernel, the sampler's
row-wise reductions, the fused norms/RoPE) routed onto CPU tensors through Triton's interpreter.
A request alone and inside a batch, with chunked prefill and prefix-cache hits: the same tokens and
logprobs within 1e-5. Not bitwise here: the interpreter's tl.dot is numpy's BLAS, whose result for
a row depends on its place inside the tile (measured: last-bit differences), which a GPU's MMA does
not; tests/runner/test_numerics_invariance_gpu.py asserts == on the device, CUDA graphs included."""
from __future__ import annotations

import random

import pytest

from tests.runner.test_numerics_invariance import _fillers, _run, _targets, path  # noqa: F401 (path: a fixture)
from tidal import LLM, SamplingParams
from tidal.attention.cuda import CudaInvariantAttentionBackend
from tidal.attention.invariant import InvariantAttentionBackend
from tidal.kernels.matmul import matmul
from tidal.models.layers import Linear
from tidal.runner.sampler import Sampler


@pytest.fixture
def cuda_path_on_cpu(monkeypatch):
    def project(self, x, w, b):
        return matmul(x, w, b) if self.batch_invariant and x.dim() == 2 else torch_linear(x, w, b)

    from torch.nn.functional import linear as torch_linear
    monkeypatch.setattr(Linear, "_project", project)
    monkeypatch.setattr(InvariantAttentionBackend, "forward",
                        lambda self, *args: CudaInvariantAttentionBackend().forward(*args))
    init = Sampler.__init__
    monkeypatch.setattr(Sampler, "__init__", lambda self, use_triton=None, batch_invariant=False:
                        init(self, use_triton, batch_invariant=True))


def test_the_cuda_path_runs_in_the_engine_on_the_interpreter(path, cuda_path_on_cpu):  # noqa: F811
    rng = random.Random(5)
    kw = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=512, batch_invariant=True,
              fused_kernels="on")
    target = _targets(rng, 2)[1]
    alone_llm = LLM(path, enable_prefix_caching=False, **kw)
    llm = LLM(path, enable_prefix_caching=True, max_num_batched_tokens=7, max_num_seqs=8, **kw)
    try:
        alone = _run(alone_llm, [target])[0]
        _run(llm, [(target[0][:-2] + [7], SamplingParams(max_tokens=1))])   # caches the target's prefix
        hits = llm.engine.core.block_manager.prefix_hits
        batch = _fillers(rng, 5, target[0])
        batch.insert(3, target)
        got = _run(llm, batch)[3]
        assert got[0] == alone[0]
        assert max(abs(a - b) for a, b in zip(got[1], alone[1])) < 1e-5
        assert llm.engine.core.block_manager.prefix_hits > hits
    finally:
        alone_llm.shutdown()
        llm.shutdown()
