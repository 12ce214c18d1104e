"""vLLM's offline API where Tidal has the same thing, each item through LLM (and the stop-string
option through AsyncLLM's streamed deltas)."""
from __future__ import annotations

import math

import pytest

from tidal import SamplingParams
from tidal.outputs import Logprob
from tests.engine.conftest import assert_no_leaks

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tiny_ckpt):
    return tiny_ckpt("qwen3")


def test_prompt_dicts_equal_plain_prompts(path, make_llm):
    llm = make_llm(path)
    ids = llm.get_tokenizer().encode("hello world", add_special_tokens=False)
    plain = llm.generate(["hello world", ids], GREEDY, use_tqdm=False)
    dicts = llm.generate([{"prompt": "hello world"}, {"prompt_token_ids": ids}], GREEDY, use_tqdm=False)
    single = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in dicts] == [o.outputs[0].token_ids for o in plain]
    assert single[0].outputs[0].token_ids == plain[1].outputs[0].token_ids
    assert dicts[0].prompt == "hello world" and dicts[1].prompt_token_ids == ids


@pytest.mark.parametrize("prompt,match", [
    ({"prompt": "a", "multi_modal_data": {}}, r"\['multi_modal_data'\]"),
    ({"prompt": "a", "prompt_token_ids": [1]}, "exactly one of"),
    ({}, "exactly one of"),
    ({"prompt": [1, 2]}, "'prompt'"),
    ({"prompt_token_ids": "abc"}, "'prompt_token_ids'"),
])
def test_bad_prompt_dicts_name_the_key(path, make_llm, prompt, match):
    llm = make_llm(path)
    with pytest.raises(ValueError, match=match):
        llm.generate([prompt], GREEDY, use_tqdm=False)
    assert_no_leaks(llm)


def test_chat_uses_the_chat_template(path, make_llm):
    llm = make_llm(path)
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    out = llm.chat(messages, GREEDY, use_tqdm=False)
    assert len(out) == 1 and out[0].prompt_token_ids == list(expected)
    both = llm.chat([messages, messages + [{"role": "assistant", "content": "yo"}]], GREEDY, use_tqdm=False)
    assert len(both) == 2 and both[0].outputs[0].token_ids == out[0].outputs[0].token_ids
    # chat_template_kwargs reach the template.
    template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    custom = llm.chat(messages, GREEDY, use_tqdm=False, chat_template=template,
                      chat_template_kwargs={"greeting": "Hey "})
    assert custom[0].prompt_token_ids == list(tok.encode("Hey hi", add_special_tokens=False))
    with pytest.raises(ValueError, match="add_generation_prompt"):
        llm.chat(messages, GREEDY, chat_template_kwargs={"add_generation_prompt": False})
    with pytest.raises(TypeError, match="tools_please"):
        llm.chat(messages, GREEDY, tools_please=True)


def test_outputs_in_vllm_shape(path, make_llm):
    llm = make_llm(path)
    out = llm.generate(["abc"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3),
                       use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finished() is True and out.finished is True
    assert len(c.token_logprobs) == 5 and math.isclose(c.cumulative_logprob, sum(c.token_logprobs))
    tok = llm.get_tokenizer()
    for t, lp, rank, top, entry in zip(c.token_ids, c.token_logprobs, c.token_ranks, c.top_logprobs, c.logprobs):
        assert next(iter(entry)) == t and entry[t] == Logprob(lp, rank, tok.decode([t]))
        assert rank == 1, "greedy picks the most likely token"
        assert list(top)[0] == t and set(top) <= set(entry)
        assert [entry[a].rank for a in top] == [1, 2, 3]
    none = llm.generate(["abc"], GREEDY, use_tqdm=False)[0].outputs[0]
    assert none.logprobs is None and none.cumulative_logprob is None and none.token_logprobs is None


def test_sampled_token_rank_counts_strictly_better_tokens(path, make_llm):
    llm = make_llm(path)
    c = llm.generate(["abc"], SamplingParams(max_tokens=30, temperature=1.5, seed=7, ignore_eos=True, logprobs=20),
                     use_tqdm=False)[0].outputs[0]
    for t, lp, rank, top in zip(c.token_ids, c.token_logprobs, c.token_ranks, c.top_logprobs):
        assert rank == 1 + sum(v > lp for v in top.values()) or (rank > 20 and t not in top)
    assert any(r > 1 for r in c.token_ranks), "temperature 1.5 should sample some non-argmax token"


def test_num_cached_tokens_and_reset_prefix_cache(path, make_llm):
    llm = make_llm(path, block_size=4)
    prompt = list(range(30, 50))  # 20 tokens: 5 blocks, the last token is always computed
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    again = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 16
    assert llm.reset_prefix_cache() is True
    after = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert after.num_cached_tokens == 0
    assert after.outputs[0].token_ids == again.outputs[0].token_ids == first.outputs[0].token_ids


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_level_and_wake_up(path, make_llm, level):
    llm = make_llm(path)
    before = llm.generate(["hello"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    res = llm.sleep(level=level)
    assert sorted(res["sleeping"]) == ["kv_cache", "weights"]
    assert llm.state()["state"] == "sleeping"
    part = llm.wake_up(tags=["weights"])
    assert part["sleeping"] == ["kv_cache"] and llm.state()["state"] == "sleeping"
    done = llm.wake_up()
    assert done["state"] == "serving" and llm.state()["state"] == "serving"
    assert llm.generate(["hello"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == before
    llm.sleep(level)  # positional, as vLLM's sleep(1)
    llm.wake_up()
    assert llm.generate(["hello"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == before
    with pytest.raises(ValueError, match="level=3"):
        llm.sleep(level=3)
    assert llm.state()["state"] == "serving"


def test_sleep_level_2_needs_weights_it_can_re_read(path, make_llm):
    llm = make_llm(path, load_format="dummy")
    with pytest.raises(ValueError, match="level=1"):
        llm.sleep(level=2)
    assert llm.state()["state"] == "serving" and llm.state()["sleeping"] == []
    assert llm.generate(["hi"], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_tidal_sleep_form_still_needs_a_pause(path, make_llm):
    llm = make_llm(path)
    with pytest.raises(Exception, match="pause it first"):
        llm.sleep(["kv_cache"])
    llm.pause()
    llm.sleep(["kv_cache"])
    llm.wake_up()
    assert llm.state()["state"] == "paused", "Tidal's form leaves the pause to the caller"
    llm.resume()


def test_unknown_engine_kwargs_are_named(path):
    from tidal import LLM
    with pytest.raises(ValueError, match=r"\['not_a_field'\]"):
        LLM(path, not_a_field=1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        LLM(path, tensor_parallel_size=2)


def _stop_of(text: str) -> str:
    """A two-character printable-ASCII stop string that occurs in `text` after its start."""
    for i in range(2, len(text) - 1):
        if all(33 <= ord(ch) < 127 for ch in text[i:i + 2]):
            return text[i:i + 2]
    raise AssertionError(f"no printable pair in {text!r}: pick another prompt")


@pytest.fixture(scope="module")
def stop_case(tiny_ckpt):
    from tidal import LLM
    path = tiny_ckpt("llama")
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=256)
    try:
        base = llm.generate(["hello"], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    finally:
        llm.shutdown()
    stop = _stop_of(base.text)
    return path, base.text, stop, base.text.find(stop)


@pytest.mark.parametrize("include", [True, False])
def test_include_stop_str_in_output_offline(stop_case, make_llm, include):
    path, text, stop, at = stop_case
    llm = make_llm(path)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)
    c = llm.generate(["hello"], params, use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == (text[:at + len(stop)] if include else text[:at])


@pytest.mark.parametrize("include", [True, False])
async def test_include_stop_str_in_streamed_deltas(stop_case, make_engine, include):
    path, text, stop, at = stop_case
    eng = make_engine(path)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)
    deltas = [out.outputs[0].text async for out in eng.generate("hello", params, delta=True)]
    assert "".join(deltas) == (text[:at + len(stop)] if include else text[:at])
    assert len(deltas) > 1, "streamed in several deltas"


async def test_async_llm_takes_prompt_dicts(path, make_engine):
    eng = make_engine(path)
    plain = [o async for o in eng.generate("hello", GREEDY)][-1]
    shaped = [o async for o in eng.generate({"prompt": "hello"}, GREEDY)][-1]
    assert shaped.outputs[0].token_ids == plain.outputs[0].token_ids
    with pytest.raises(ValueError, match="cache_salt"):
        async for _ in eng.generate({"prompt": "hello", "cache_salt": "x"}, GREEDY):
            pass
