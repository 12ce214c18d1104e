"""examples/grpo.py against a real `tidal serve` on CPU: the policy learns the digits task, the
trainer's logprobs match Tidal's (fp32, same weight version), every push is the version the
engine then serves, and the asynchronous mode counts its stale tokens and keeps them within
--max-staleness."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "grpo.py")
_spec = importlib.util.spec_from_file_location("tidal_example_grpo", _PATH)
grpo = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = grpo
_spec.loader.exec_module(grpo)

# Short enough for CI: 8 prompts x 8 samples x 8 tokens per step, a high learning rate.
SHORT = ["--prompts", "8", "--n", "8", "--max-tokens", "8", "--lr", "1e-2", "--last", "3",
         "--threads", "0", "--no-progress"]


@pytest.fixture(scope="module")
def tidal_url(tiny_ckpt, tmp_path_factory):
    """(model dir, url): one server for the runs below; each run first pushes its own initial
    weights (the --url path), so a run never starts from the weights the previous one trained."""
    model = tiny_ckpt("llama")
    server = grpo.TidalServer(model, "cpu", "float32", 64, str(tmp_path_factory.mktemp("grpo-serve")))
    yield model, server.url
    server.stop()


def _check_versions(result: dict) -> None:
    base = result["base_version"]
    for r in result["steps"]:
        assert r["push_version"] == r["served_version"] == base + r["step"], r


def test_grpo_learns_and_logprobs_match(tidal_url, tmp_path):
    model, url = tidal_url
    out, png = tmp_path / "grpo.json", tmp_path / "grpo.png"
    res = grpo.main(["--model", model, "--url", url, "--steps", "8", *SHORT, "--out", str(out), "--plot", str(png)])
    # The uniform policy scores 10/272; the random-init model about the same (its first step).
    assert res["random_policy_reward"] == pytest.approx(10 / 272)
    assert res["first_step_reward"] < 0.2
    assert res["last_steps_reward"] > res["random_policy_reward"] + 0.35, [r["reward_mean"] for r in res["steps"]]
    assert res["last_steps_reward"] > res["first_step_reward"] + 0.3
    for r in res["steps"]:
        assert r["mismatch_tokens"] == r["rollout_tokens"] > 0      # synchronous: every token counts
        assert r["mismatch_mean"] < 1e-4 and r["mismatch_max"] < 1e-3, r
        assert r["stale_tokens"] == r["masked_tokens"] == 0
    _check_versions(res)
    assert out.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grpo_async_counts_stale_tokens_within_bound(tidal_url):
    model, url = tidal_url
    res = grpo.main(["--model", model, "--url", url, "--steps", "6", *SHORT, "--async-steps", "1",
                     "--max-staleness", "1"])
    steps = res["steps"]
    assert len(steps) == 6
    assert res["stale_tokens"] > 0                      # rollouts overlapped training
    assert res["max_staleness_seen"] == 1 and res["masked_tokens"] == 0
    assert steps[0]["stale_tokens"] == 0                # nothing was pushed before step 1's rollout
    for r in steps:
        assert r["submit_version"] >= res["base_version"] + r["step"] - 2   # the gate: at most 1 ahead
    _check_versions(res)
    assert res["last_steps_reward"] > res["first_step_reward"] + 0.1


def test_grpo_async_with_zero_staleness_is_synchronous(tidal_url):
    model, url = tidal_url
    res = grpo.main(["--model", model, "--url", url, "--steps", "3", *SHORT, "--async-steps", "1",
                     "--max-staleness", "0"])
    assert res["stale_tokens"] == res["masked_tokens"] == res["max_staleness_seen"] == 0
    assert all(r["submit_version"] == res["base_version"] + r["step"] - 1 for r in res["steps"])
    _check_versions(res)


def _policy(tiny_ckpt):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_ckpt("llama"), dtype=torch.float32)


def _args(**kw):
    args = grpo.build_parser().parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_tokens_older_than_max_staleness_are_masked(tiny_ckpt):
    """Version 3 trains on samples from versions 1 and 2: with --max-staleness 0 every token is
    masked (no update at all), with 1 the version-2 ones count; stale tokens are counted either way."""
    policy = _policy(tiny_ckpt)
    samples = [grpo.Sample(0, [65, 66], [48, 49, 50], [-5.0, -5.0, -5.0], [1, 1, 2], reward=1.0, advantage=1.0),
               grpo.Sample(0, [65, 66], [67, 68], [-5.0, -5.0], [2, 2], reward=0.0, advantage=-1.0)]
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    st = grpo.train_step(policy, opt, samples, 3, _args(max_staleness=0, ppo_epochs=1), pad_id=258)
    assert (st.stale_tokens, st.masked_tokens, st.max_staleness_seen) == (5, 5, 2)
    assert st.mismatch_tokens == 0 and st.mismatch_mean is None
    assert all(torch.equal(before[n], p) for n, p in policy.named_parameters())
    st = grpo.train_step(policy, opt, samples, 3, _args(max_staleness=1, ppo_epochs=1), pad_id=258)
    assert (st.stale_tokens, st.masked_tokens) == (5, 2)
    assert any(not torch.equal(before[n], p) for n, p in policy.named_parameters())


def test_trainer_logprobs_of_a_batch_match_one_sequence_at_a_time(tiny_ckpt):
    """Right-padding and the gather of output positions: the batched logprobs equal each
    sample's own unpadded forward pass."""
    policy = _policy(tiny_ckpt).eval()
    samples = [grpo.Sample(0, [65, 66, 67], [48, 49], [0.0, 0.0], [0, 0]),
               grpo.Sample(1, [70], [50, 51, 52, 53], [0.0] * 4, [0] * 4)]
    with torch.no_grad():
        batched = grpo.token_logprobs(policy, grpo.Batch.pack(samples, 258, torch.device("cpu")))
        for i, s in enumerate(samples):
            ids = torch.tensor([s.prompt_ids + s.output_ids])
            logits = policy(input_ids=ids).logits[0].log_softmax(-1)
            p = len(s.prompt_ids)
            want = torch.stack([logits[p - 1 + j, t] for j, t in enumerate(s.output_ids)])
            torch.testing.assert_close(batched[i, :len(s.output_ids)], want, rtol=0, atol=1e-5)


def test_group_advantages_and_token_versions():
    samples = [grpo.Sample(g, [1], [2], [0.0], [0], reward=r) for g, r in ((0, 1.0), (0, 0.0), (1, 0.5), (1, 0.5))]
    grpo.group_advantages(samples)
    assert [round(s.advantage, 4) for s in samples] == [1.0, -1.0, 0.0, 0.0]
    assert grpo.token_versions([[3, 0, 2], [4, 2, 5]], 5) == [3, 3, 4, 4, 4]
    with pytest.raises(ValueError, match="do not cover"):
        grpo.token_versions([[3, 0, 2]], 4)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_grpo_default_run_learns(tmp_path):
    """The README's command as it is (its own server, 16 prompts x 8 samples, 30 steps)."""
    res = grpo.main(["--threads", "0", "--no-progress", "--out", str(tmp_path / "grpo.json")])
    assert res["last_steps_reward"] > 0.8 and res["first_step_reward"] < 0.2
    assert res["mismatch_mean"] < 1e-4
    _check_versions(res)
