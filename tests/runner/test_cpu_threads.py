"""On the CPU a step runs its torch ops on every intra-op thread only when its linear work pays
for the split (ModelRunner.cpu_step_threads): small decode steps on one thread, long prompts on
all of them, and torch's thread count is the same after every step as before it."""
from __future__ import annotations

import pytest
import torch

from tidal import LLM, SamplingParams
from tidal.runner import runner as runner_mod


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_small_steps_run_on_one_thread_large_ones_on_all(tiny_ckpt, two_threads, monkeypatch):
    llm = LLM(tiny_ckpt("llama"), dtype="float32", device="cpu", max_num_batched_tokens=512)
    try:
        runner = llm.engine.core.runner
        assert runner.cpu_threads == 2
        # the tiny model's layers are small: put the split point at a 300-token step
        monkeypatch.setattr(runner_mod, "CPU_SPLIT_MIN_WORK", int(300 * runner.layer_params))
        seen: list[tuple[int, int]] = []  # (tokens in the step, torch's threads during its forward)
        forward = runner.model.forward

        def recording(input_ids, positions, ctx):
            seen.append((input_ids.shape[0], torch.get_num_threads()))
            return forward(input_ids, positions, ctx)

        monkeypatch.setattr(runner.model, "forward", recording)
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        out = llm.generate([list(range(1, 100)) * 4, [5, 6, 7]], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 3 for o in out)
        assert torch.get_num_threads() == 2  # put back after every step
    finally:
        llm.shutdown()
    assert seen[0][0] >= 300 and seen[0][1] == 2  # the 399-token prefill step: both threads
    decode = [threads for tokens, threads in seen if tokens <= 2]
    assert decode and set(decode) == {1}  # two decode rows: one thread


def test_outputs_do_not_depend_on_the_step_thread_policy(tiny_ckpt, two_threads, monkeypatch):
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6] * 20, [2, 7, 1, 8]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    results = []
    for split_at in (1, 1 << 60):  # every step on both threads; every step on one
        monkeypatch.setattr(runner_mod, "CPU_SPLIT_MIN_WORK", split_at)
        llm = LLM(tiny_ckpt("llama"), dtype="float32", device="cpu")
        try:
            results.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        finally:
            llm.shutdown()
    assert results[0] == results[1]
