"""Colocated weight transfer on a GPU: a trainer process shares its CUDA tensors as IPC handles
(sent as JSON fields, never pickled); the engine copies them and then serves B's outputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tidal import LLM, SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [[5, 6, 7], [42] * 9]

TRAINER = r"""
import json, sys, torch
from tidal.engine.weight_transfer import encode_ipc_handle
from tidal.models.loader import iter_checkpoint
tensors = [(n, t.to("cuda", torch.bfloat16).contiguous()) for n, t in iter_checkpoint(sys.argv[1])]
torch.cuda.synchronize()
print(json.dumps({"tensors": [{"name": n, "dtype": "bfloat16", "shape": list(t.shape)} for n, t in tensors],
                  "handles": [encode_ipc_handle(t) for _, t in tensors]}), flush=True)
sys.stdin.readline()   # keep the tensors alive until the engine has copied them
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("staging", ["copy", "in_place"])
def test_ipc_push_matches_b(tiny_ckpt, staging):
    """Both stagings; in place with CUDA graphs captured (the live storage is written, so the
    graphs replay the new weights without recapture)."""
    a, b = tiny_ckpt("qwen2", seed=0), tiny_ckpt("qwen2", seed=1)
    ref = LLM(b, device="cuda", dtype="bfloat16", block_size=16, num_kv_blocks=256)
    on_b = [o.outputs[0].token_ids for o in ref.generate(PROMPTS, GREEDY, use_tqdm=False)]
    ref.shutdown()
    llm = LLM(a, device="cuda", dtype="bfloat16", block_size=16, num_kv_blocks=256)
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, b], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        msg = json.loads(proc.stdout.readline())
        res = llm.update_weights(source="ipc", tensors=msg["tensors"], ipc_handles=msg["handles"], version=2,
                                 timeout_s=120, staging=staging)
        assert res["weight_version"] == 2 and res["staging"] == staging
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(60)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == on_b
    llm.shutdown()
