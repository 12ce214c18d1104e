"""The engine on a GPU, end to end (bf16, CUDA attention backend, CUDA graphs, overlap scheduling)
against HF transformers on the same random checkpoints. Run on the device with `pytest -m gpu`.

- logprobs: the engine's per-token logprobs of the tokens it generated agree with HF's
  log-softmax over the same token sequence (teacher-forced) to within 0.02 mean absolute difference;
- greedy: the first 16 generated tokens equal HF `generate`'s for at least 90% of prompts.
"""
from __future__ import annotations

import pytest
import torch

from tidal import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NUM_TOKENS = 16


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 250, (int(n),), generator=g).tolist()
            for n in torch.randint(2, 80, (24,), generator=g)]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def engine_and_hf(request, tiny_ckpt):
    from transformers import AutoModelForCausalLM

    path = tiny_ckpt(request.param)
    llm = LLM(path, dtype="bfloat16", device="cuda", block_size=16, max_num_seqs=32,
              gpu_memory_utilization=0.3)
    assert llm.engine.core.runner.graphs is not None, "CUDA graphs are on by default on a GPU"
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    yield llm, hf
    llm.shutdown()


def test_logprobs_match_hf_on_the_same_tokens(engine_and_hf):
    llm, hf = engine_and_hf
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True, logprobs=0),
                        use_tqdm=False)
    diffs = []
    for prompt, out in zip(prompts, outs):
        c = out.outputs[0]
        ids = torch.tensor([prompt + c.token_ids], device="cuda")
        with torch.no_grad():
            logits = hf(ids).logits[0, len(prompt) - 1:-1].float()
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids, device="cuda")[:, None])[:, 0]
        diffs.append((ref.cpu() - torch.tensor(c.logprobs)).abs())
    mean = torch.cat(diffs).mean().item()
    assert mean <= 0.02, f"mean |logprob - HF| = {mean:.4f}"
    assert llm.state()["overlapped_steps"] > 0


def test_greedy_matches_hf_generate(engine_and_hf):
    llm, hf = engine_and_hf
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    same = 0
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_TOKENS,
                              min_new_tokens=NUM_TOKENS, do_sample=False)
        same += gen[0, len(prompt):].tolist() == out.outputs[0].token_ids
    assert same >= 0.9 * len(prompts), f"{same}/{len(prompts)} prompts agree with HF on {NUM_TOKENS} tokens"


def test_control_plane_on_gpu(engine_and_hf):
    """Sleep frees memory and rebuilds graphs on wake; outputs are unchanged afterwards."""
    llm, _ = engine_and_hf
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(_prompts()[:8], params, use_tqdm=False)]
    llm.pause()
    llm.sleep(["kv_cache", "weights"])
    assert llm.engine.core.runner.graphs is None
    llm.wake_up()
    llm.resume()
    after = [o.outputs[0].token_ids for o in llm.generate(_prompts()[:8], params, use_tqdm=False)]
    assert after == before
    assert llm.engine.core.runner.graphs is not None
