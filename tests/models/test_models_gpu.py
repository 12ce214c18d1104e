"""The models on a GPU with the CUDA attention backend: parity with HF, bf16, and capture of a
decode step in a CUDA graph (which fails on any host sync). Run on the device with `pytest -m gpu`."""
from __future__ import annotations

import pytest
import torch

from tidal.attention.base import AttentionMetadata, get_backend
from tidal.models import load_model
from tidal.attention.context import ForwardContext
from tests.helpers import PagedRunner

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = [[7, 100, 3, 42, 250, 9, 18], [5], [200, 31, 64, 2, 77, 12, 90, 33, 150, 8, 61, 4, 255, 19] * 5]


def _hf(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-2), (torch.bfloat16, 0.1)])
def test_cuda_backend_matches_hf(tiny_ckpt, arch, dtype, tol):
    # float32 tolerance covers the Triton kernels' TF32 dot products.
    path = tiny_ckpt(arch)
    model = load_model(path, dtype, "cuda")
    hf = _hf(path, dtype)
    runner = PagedRunner(model, len(PROMPTS), max_len=128, block_size=16, backend="cuda")
    seqs = [list(p) for p in PROMPTS]
    logits = runner.step(PROMPTS)
    for _ in range(3):
        with torch.no_grad():
            for seq, ours in zip(seqs, logits):
                ref = hf(torch.tensor([seq], device="cuda")).logits[0, -ours.shape[0]:].float()
                assert (ours - ref).abs().max().item() < tol
        nxt = [[int(l[-1].argmax())] for l in logits]
        for seq, t in zip(seqs, nxt):
            seq += t
        logits = runner.step(nxt)


@torch.no_grad()
def test_decode_step_captures_in_cuda_graph(tiny_ckpt):
    model = load_model(tiny_ckpt("qwen3"), torch.bfloat16, "cuda")
    runner = PagedRunner(model, len(PROMPTS), max_len=128, block_size=16, backend="cuda")
    prefill = runner.step(PROMPTS)
    tokens = torch.tensor([int(l[-1].argmax()) for l in prefill], device="cuda")
    lens = torch.tensor(runner.lens, device="cuda")
    bs = runner.block_size

    def make_meta(lens: torch.Tensor) -> AttentionMetadata:
        rows = torch.arange(len(PROMPTS), device="cuda")
        slots = runner.block_tables[rows, lens // bs].long() * bs + lens % bs
        return AttentionMetadata(
            slot_mapping=slots, query_start_loc=torch.arange(len(PROMPTS) + 1, device="cuda", dtype=torch.int32),
            seq_lens=(lens + 1).int(), block_tables=runner.block_tables, max_query_len=1, max_seq_len=128,
            query_lens_cpu=[1] * len(PROMPTS), seq_lens_cpu=[128] * len(PROMPTS))

    # Eager reference on a copy of the cache.
    cache0 = runner.kv_cache.clone()
    backend = get_backend("cuda")
    eager = model.compute_logits(model(tokens, lens, ForwardContext(make_meta(lens), runner.kv_cache, backend)))

    runner.kv_cache.copy_(cache0)
    static_ids, static_pos = torch.zeros_like(tokens), torch.zeros_like(lens)
    meta = make_meta(static_pos)
    ctx = ForwardContext(meta, runner.kv_cache, backend)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):   # warm-up (Triton compiles) outside the capture
        model.compute_logits(model(static_ids, static_pos, ctx))
    torch.cuda.current_stream().wait_stream(stream)
    runner.kv_cache.copy_(cache0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        meta.slot_mapping = (runner.block_tables[torch.arange(len(PROMPTS), device="cuda"), static_pos // bs].long()
                             * bs + static_pos % bs)
        meta.seq_lens = (static_pos + 1).int()
        out = model.compute_logits(model(static_ids, static_pos, ctx))
    static_ids.copy_(tokens)
    static_pos.copy_(lens)
    runner.kv_cache.copy_(cache0)
    graph.replay()
    torch.cuda.synchronize()
    assert (out - eager).abs().max().item() < 1e-2
