"""The offline API's behaviour: seeds, n samples sharing blocks, stop conditions, errors."""
from __future__ import annotations

import pytest

from tidal import SamplingParams
from tests.engine.conftest import assert_no_leaks


@pytest.fixture(scope="module")
def path(tiny_ckpt):
    return tiny_ckpt("llama")


def test_seeded_sampling_is_reproducible_across_batch_compositions(path, make_llm):
    llm = make_llm(path)
    target = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = llm.generate(["the quick brown fox"], target, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=n, temperature=0.7) for n in (3, 20, 7)]
    mixed = llm.generate(["a", "the quick brown fox", "bb", "ccc"], [others[0], target, others[1], others[2]],
                         use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=99)
    assert llm.generate(["the quick brown fox"], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone
    assert_no_leaks(llm)


def test_n_samples_share_prompt_blocks(path, make_llm):
    llm = make_llm(path, block_size=4)
    core = llm.engine.core
    prompt = list(range(30, 48))  # 18 tokens: 4 full blocks + a partial one
    seen: list[list[list[int]]] = []
    real_step = core.step

    def spy():
        real_step()
        running = [r for r in core.scheduler.running if r.request_id == "grp"]
        if len(running) == 4:
            seen.append([list(r.block_table) for r in running])
    core.step = spy
    out = llm.generate([prompt], SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=3, ignore_eos=True),
                       use_tqdm=False, request_ids=["grp"])[0]
    core.step = real_step
    assert len(out.outputs) == 4 and [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "samples should differ"
    forked, next_step = seen[0], seen[1]
    assert all(t == forked[0] for t in forked), "right after the fork every prompt block is shared"
    assert all(t[:4] == forked[0][:4] for t in next_step), "full prompt blocks stay shared"
    assert len({t[4] for t in next_step}) == 4, "the partial block was copied on write"
    assert forked[0][4] in {t[4] for t in next_step}, "its last owner kept writing in place"
    assert_no_leaks(llm)


def test_stop_conditions(path, make_llm):
    llm = make_llm(path)
    base = llm.generate(["hello"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    # stop_token_ids: stop at the 5th token's id, which is kept in the output
    tok = base.token_ids[4]
    first = base.token_ids.index(tok)
    out = llm.generate(["hello"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                 stop_token_ids=[tok]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop" and out.stop_reason == tok
    # min_tokens bans the stop id until reached
    out = llm.generate(["hello"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                 stop_token_ids=[tok], min_tokens=first + 1),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) > first + 1 and tok not in out.token_ids[:first + 1]
    # stop strings: the output text is cut before the stop string (byte-level: ids < 128 are ASCII)
    llm2 = make_llm(path)
    ascii_at = [i for i, t in enumerate(base.token_ids) if 33 <= t < 127 and i >= 2]
    assert ascii_at, "the tiny model should emit some printable ASCII"
    stop = chr(base.token_ids[ascii_at[0]])
    out = llm2.generate(["hello"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]),
                        use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == base.text[:base.text.find(stop)]
    assert out.token_ids == base.token_ids[:base.token_ids.index(ord(stop)) + 1]


def test_eos_stops_unless_ignored(path, make_llm):
    llm = make_llm(path)
    eos = set(llm.engine.core.eos_token_ids)
    prompts = [[i] for i in range(1, 40)]
    stopped = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
    ignored = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), use_tqdm=False)
    assert any(o.outputs[0].finish_reason == "stop" for o in stopped), "pick prompts that hit EOS"
    for s, g in zip(stopped, ignored):
        c, full = s.outputs[0], g.outputs[0]
        assert full.finish_reason == "length" and len(full.token_ids) == 24
        assert full.token_ids[:len(c.token_ids)] == c.token_ids
        if c.finish_reason == "stop":
            assert c.token_ids[-1] in eos and c.stop_reason == c.token_ids[-1]
            assert not eos & set(c.token_ids[:-1])
        else:
            assert c.finish_reason == "length" and not eos & set(c.token_ids)


def test_top_logprobs(path, make_llm):
    llm = make_llm(path)
    c = llm.generate(["abc"], SamplingParams(max_tokens=4, temperature=0, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(c.top_logprobs) == 4
    for tok, lp, top in zip(c.token_ids, c.token_logprobs, c.top_logprobs):
        assert len(top) == 3 and tok in top and abs(top[tok] - lp) < 1e-6  # greedy = the top-1


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=0, n=2), "n"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(n=0), "n"), (dict(temperature=-1.0), "temperature"), (dict(min_p=2.0), "min_p"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_before_any_state_change(path, make_llm):
    llm = make_llm(path)
    before = llm.state()
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len=512"):
        llm.generate(["hi", "x" * 500], SamplingParams(max_tokens=20), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([[1, 2, 10**6]], use_tqdm=False)
    after = llm.state()
    assert after["step_count"] == before["step_count"] and after["num_waiting"] == 0


def test_bad_model_directories(tmp_path, tiny_ckpt):
    import json
    import shutil

    from tidal import LLM
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(empty), device="cpu")
    noweights = tmp_path / "noweights"
    shutil.copytree(tiny_ckpt("llama"), noweights)
    for f in noweights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(noweights), device="cpu")
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_ckpt("llama"), unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (unknown / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        LLM(str(unknown), device="cpu")


def test_dummy_load_format(path, make_llm):
    llm = make_llm(path, load_format="dummy")
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_n_samples_with_chunked_prefill(path, make_llm):
    """Regression: the forks of an n-sample prompt must survive the prompt's prefill chunks."""
    llm = make_llm(path, max_num_batched_tokens=8)
    prompt = list(range(60, 90))
    out = llm.generate([prompt], SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=11, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [len(c.token_ids) for c in out.outputs] == [5, 5, 5]
    ref = make_llm(path).generate([prompt], SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=11,
                                                           ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs]
    assert_no_leaks(llm)


def test_offline_generate_gets_one_output_per_sample(path, make_llm):
    """LLM.generate asks for final outputs only: the core sends nothing per token, and the
    results (tokens, logprobs) are the same as a streamed request's."""
    llm = make_llm(path)
    seen = []
    core = llm.engine.core
    dispatch = core.output_handler
    core.output_handler = lambda outs: (seen.extend(outs), dispatch(outs))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0, n=2)
    outs = llm.generate(["abc", "hello there"], params, use_tqdm=False)
    assert len(seen) == 4 and all(o.finish_reason == "length" for o in seen)
    for o in outs:
        for c in o.outputs:
            assert len(c.token_ids) == 12 and len(c.token_logprobs) == 12
