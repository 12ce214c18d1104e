"""No Triton kernel compiles a new variant once the engine has seen a few batches.

Triton specializes a kernel on the 16-byte alignment of its pointer arguments (and on integer
arguments equal to 1 or divisible by 16). A step's small arrays used to be packed back to back into
one staging buffer, so their alignment followed the batch's sizes and new sizes compiled new
variants mid-run (about a second each on the H100). Run on the device with `pytest -m gpu`.
"""
from __future__ import annotations

import pytest
import torch

from tidal import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _kernels():
    from tidal.kernels import fused, kv_store, paged_decode, paged_prefill, sampling
    return {"prefill": paged_prefill._prefill_kernel, "decode": paged_decode._decode_split_kernel,
            "store_kv": kv_store._store_kv_kernel, "race": sampling._race_kernel,
            "add_rms_norm": fused._add_rms_norm_kernel, "qk_norm_rope": fused._qk_norm_rope_kernel,
            "silu_mul": fused._silu_mul_kernel}


def _variants() -> dict[str, int]:
    """Compiled variants per kernel (the first element of each per-device cache entry is the
    specialization -> kernel map in Triton 3.x)."""
    out = {}
    for name, fn in _kernels().items():
        caches = getattr(fn, "device_caches", None)
        if caches is None:
            pytest.skip("this Triton version keeps no readable per-device kernel cache")
        out[name] = sum(len(entry[0]) for entry in caches.values())
    return out


def _round(llm: LLM, sizes: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for n in sizes:
        prompts = [torch.randint(0, 250, (int(k),), generator=g).tolist()
                   for k in torch.randint(3, 60, (n,), generator=g)]
        llm.generate(prompts, SamplingParams(temperature=0.8, max_tokens=int(torch.randint(3, 12, (1,), generator=g)),
                                             ignore_eos=True), use_tqdm=False)


def test_batch_sizes_do_not_compile_new_kernel_variants(tiny_ckpt):
    llm = LLM(tiny_ckpt("qwen3"), dtype="bfloat16", device="cuda", block_size=16, max_num_seqs=32,
              gpu_memory_utilization=0.3)
    try:
        _round(llm, [4, 8], seed=0)
        before = _variants()
        assert before["prefill"] and before["race"] and before["qk_norm_rope"], before
        _round(llm, [1, 3, 5, 7, 10, 17, 31], seed=1)   # odd and even sizes, other lengths
        assert _variants() == before
    finally:
        llm.shutdown()
