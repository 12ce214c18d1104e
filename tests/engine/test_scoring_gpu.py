"""Prompt logprobs and penalties on a GPU (CUDA graphs, overlap scheduling): float32 models against
HF's float32 numbers, as on the CPU. Run on the device with `pytest -m gpu`."""
from __future__ import annotations

import pytest
import torch

from tidal import LLM, SamplingParams
from tests.engine.test_penalties import _hf_greedy
from tests.engine.test_prompt_logprobs import _hf_reference, _prompts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def engine_and_hf(request, tiny_ckpt):
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    path = tiny_ckpt(request.param)
    llm = LLM(path, dtype="float32", device="cuda", block_size=16, max_num_seqs=32, max_num_batched_tokens=24,
              gpu_memory_utilization=0.3)
    assert llm.engine.core.runner.graphs is not None
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield llm, hf
    llm.shutdown()


def test_prompt_logprobs_match_hf_on_gpu(engine_and_hf):
    llm, hf = engine_and_hf
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2), use_tqdm=False)
    for p, out in zip(prompts, outs):
        lps, _, tops = _hf_reference(hf, p, 2)
        got = out.prompt_token_logprobs[1:]
        assert len(got) == len(lps)
        assert max((abs(a - b) for a, b in zip(got, lps)), default=0.0) < 1e-4
        for mine, theirs in zip(out.prompt_top_logprobs[1:], tops):
            assert max(abs(mine[t] - theirs[t]) for t in theirs) < 1e-4


def test_penalised_greedy_matches_the_reference_loop_on_gpu(engine_and_hf):
    llm, hf = engine_and_hf
    prompts = [[52, 52, 52, 10], list(range(60, 75)), [3]]
    case = dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **case)
    outs = llm.generate(prompts + prompts, [params] * 3 + [SamplingParams(max_tokens=12, temperature=0.0,
                                                                            ignore_eos=True)] * 3, use_tqdm=False)
    for p, out in zip(prompts, outs[:3]):
        assert out.outputs[0].token_ids == _hf_greedy(hf, p, 12, 1.5, 0.5, 0.3)
