"""The official `openai` client against `tidal serve`: completions, chat, streaming, n, stop,
logprobs, seed; greedy output equals the offline LLM. Plus /generate, /v1/models, /metrics and
bad input."""
from __future__ import annotations

import math

import httpx
import openai
import pytest

from tidal import LLM, SamplingParams

PROMPTS = ["Hello, Tidal", "The quick brown fox", "RL needs rollouts"]


@pytest.fixture(scope="module")
def llm(server_model):
    llm = LLM(server_model, block_size=4, num_kv_blocks=1024, max_num_seqs=8)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(oai):
    return oai.models.list().data[0].id


def test_models(oai, server_model):
    import os
    models = oai.models.list().data
    assert [m.id for m in models] == [os.path.basename(server_model)]   # the directory's name
    assert models[0].owned_by == "tidal" and models[0].model_extra["max_model_len"] == 512


def test_completions_greedy_equals_offline(oai, llm, model_name):
    ref = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    for prompt, r in zip(PROMPTS, ref):
        resp = oai.completions.create(model=model_name, prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"return_token_ids": True})
        c = resp.choices[0]
        assert c.text == r.outputs[0].text
        assert c.model_extra["token_ids"] == r.outputs[0].token_ids
        assert c.finish_reason == r.outputs[0].finish_reason
        assert resp.usage.completion_tokens == len(r.outputs[0].token_ids)
        assert resp.usage.prompt_tokens == len(r.prompt_token_ids)


def test_completions_batch_of_prompts(oai, llm, model_name):
    ref = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, n=2), use_tqdm=False)
    resp = oai.completions.create(model=model_name, prompt=PROMPTS, max_tokens=8, temperature=0, n=2)
    assert sorted(c.index for c in resp.choices) == list(range(2 * len(PROMPTS)))
    for c in resp.choices:
        assert c.text == ref[c.index // 2].outputs[c.index % 2].text


def test_chat_greedy_equals_offline(oai, llm, model_name):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    ref = llm.generate([ids], SamplingParams(max_tokens=20, temperature=0.0), use_tqdm=False)[0].outputs[0]
    resp = oai.chat.completions.create(model=model_name, messages=messages, max_tokens=20, temperature=0)
    assert resp.choices[0].message.content == ref.text
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == ref.finish_reason


def test_streaming_completion_equals_non_streaming(oai, model_name):
    kw = dict(model=model_name, prompt=PROMPTS[1], max_tokens=30, temperature=0, extra_body={"return_token_ids": True})
    full = oai.completions.create(**kw)
    text, ids, reasons = "", [], []
    for chunk in oai.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if not chunk.choices:
            assert chunk.usage.completion_tokens == len(ids)
            continue
        text += chunk.choices[0].text
        ids += chunk.choices[0].model_extra["token_ids"]
        reasons.append(chunk.choices[0].finish_reason)
    assert text == full.choices[0].text
    assert ids == full.choices[0].model_extra["token_ids"]
    assert reasons[-1] == full.choices[0].finish_reason and all(r is None for r in reasons[:-1])


def test_streaming_chat(oai, model_name):
    messages = [{"role": "user", "content": "stream please"}]
    full = oai.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0)
    parts, roles, last = [], [], None
    for chunk in oai.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0,
                                             stream=True):
        d = chunk.choices[0].delta
        roles.append(d.role)
        parts.append(d.content or "")
        last = chunk.choices[0].finish_reason
    assert roles[0] == "assistant"
    assert "".join(parts) == full.choices[0].message.content
    assert last == full.choices[0].finish_reason


def test_n_and_seed(oai, model_name):
    kw = dict(model=model_name, prompt="sample me", max_tokens=12, temperature=1.0, n=3, seed=1234)
    a = oai.completions.create(**kw)
    b = oai.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in sorted(a.choices, key=lambda c: c.index)] == \
           [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len({c.text for c in a.choices}) > 1  # different samples of one prompt


def test_streaming_n(oai, model_name):
    got: dict[int, str] = {0: "", 1: ""}
    done = set()
    for chunk in oai.completions.create(model=model_name, prompt="two streams", max_tokens=10, n=2, seed=7,
                                        stream=True):
        for c in chunk.choices:
            got[c.index] += c.text
            if c.finish_reason:
                done.add(c.index)
    ref = oai.completions.create(model=model_name, prompt="two streams", max_tokens=10, n=2, seed=7)
    assert done == {0, 1}
    assert got == {c.index: c.text for c in ref.choices}


def test_stop_string(oai, model_name):
    full = oai.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=30, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    k = next(i for i in range(3, len(full) - 2) if full[i:i + 2].isprintable() and "\ufffd" not in full[i:i + 2])
    stop = full[k:k + 2]
    expect = full[:full.find(stop)]
    for stream in (False, True):
        kw = dict(model=model_name, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
        if stream:
            chunks = list(oai.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            c = oai.completions.create(**kw).choices[0]
            text, reason = c.text, c.finish_reason
        assert text == expect, (stream, stop, full)
        assert reason == "stop"


def test_logprobs_completions(oai, llm, model_name):
    ref = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=10, temperature=0.0, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    c = oai.completions.create(model=model_name, prompt=PROMPTS[2], max_tokens=10, temperature=0,
                               logprobs=2).choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(lp.token_logprobs, ref.token_logprobs))
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)


def test_logprobs_zero_has_the_sampled_token_per_position(oai, model_name):
    """vLLM's shape (TRL's VLLMClient reads it with its default logprobs=0): each position's top
    dict holds the sampled token itself, and the k best plus it when it is not among them."""
    for k, temperature in ((0, 0.0), (0, 1.0), (1, 1.0)):
        lp = oai.completions.create(model=model_name, prompt=PROMPTS[2], max_tokens=8, temperature=temperature,
                                    seed=3, logprobs=k, extra_body={"return_tokens_as_token_ids": True}
                                    ).choices[0].logprobs
        assert len(lp.top_logprobs) == len(lp.tokens) == 8
        for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert top[tok] == tlp and max(k, 1) <= len(top) <= k + 1


def test_logprobs_chat(oai, model_name):
    resp = oai.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) >= 1 for t in content)


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert "no-such-model" in str(e.value)


def test_oversize_prompt_is_400_with_limit(oai, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model_name, prompt="x" * 600, max_tokens=4)
    assert "max_model_len=512" in str(e.value)


@pytest.mark.parametrize("body,field", [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),     # 0 is vLLM's scoring call (issue 13)
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [999999]}, "prompt"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),   # [-2, 2] is served (issue 13)
    ({"prompt": "x", "top_k": -5}, "top_k"),
])
def test_bad_completion_input_names_the_field(server, body, field):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in err["message"], err


def test_bad_json_is_400(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]},
                   timeout=30)
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]


def test_generate_token_in_token_out(server, llm):
    ids = [72, 101, 108, 108, 111]
    ref = llm.generate([ids], SamplingParams(max_tokens=12, temperature=0.0, logprobs=0), use_tqdm=False)[0]
    r = httpx.post(server.url + "/generate", json={"input_ids": ids, "sampling_params":
                                                   {"max_tokens": 12, "temperature": 0}}, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["output_ids"] == ref.outputs[0].token_ids
    assert len(out["output_logprobs"]) == len(out["output_ids"])
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(out["output_logprobs"], ref.outputs[0].token_logprobs))
    assert out["weight_version"] == 0 and out["weight_spans"] == [[0, 0, len(out["output_ids"])]]
    assert out["prompt_tokens"] == 5 and out["completion_tokens"] == len(out["output_ids"])
    assert out["finish_reason"] in ("stop", "length") and out["text"] == ref.outputs[0].text


def test_generate_n_and_stream(server):
    body = {"text": "group", "sampling_params": {"max_tokens": 8, "n": 4, "seed": 3, "temperature": 1.0}}
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    samples = r.json()
    assert isinstance(samples, list) and [s["index"] for s in samples] == [0, 1, 2, 3]
    streamed: dict[int, list[int]] = {i: [] for i in range(4)}
    finished = {}
    deltas = {**body, "stream": True, "incremental_streaming_output": True}
    with httpx.stream("POST", server.url + "/generate", json=deltas, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = httpx.Response(200, content=line[6:]).json()
            streamed[ev["index"]] += ev["output_ids"]
            if ev["finish_reason"]:
                finished[ev["index"]] = ev["finish_reason"]
    assert {i: s["output_ids"] for i, s in enumerate(samples)} == streamed
    assert finished == {s["index"]: s["finish_reason"] for s in samples}


def test_generate_bad_input(server):
    for body, field in [({"sampling_params": {"max_tokens": 2}}, "input_ids"),
                        ({"input_ids": [1], "text": "x"}, "input_ids"),
                        ({"input_ids": [1], "sampling_params": {"min_p": 2}}, "sampling_params.min_p"),
                        ({"input_ids": [-1]}, "input_ids")]:
        r = httpx.post(server.url + "/generate", json=body, timeout=30)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (body, r.text)


def test_metrics(server, oai, model_name):
    oai.completions.create(model=model_name, prompt="count me", max_tokens=3, temperature=0,
                           extra_body={"ignore_eos": True})
    server.control("/v1/flush_cache")
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for series in ("tidal_requests_total{", "tidal_generation_tokens_total", "tidal_prompt_tokens_total",
                   "tidal_num_requests_running", "tidal_num_requests_waiting", "tidal_kv_cache_usage_ratio",
                   "tidal_engine_step_seconds_bucket", "tidal_control_ops_total{", "tidal_control_op_seconds_bucket",
                   "tidal_weight_version", "tidal_time_to_first_token_seconds", "tidal_engine_healthy"):
        assert series in text, series
    assert 'finish_reason="length"' in text
    assert 'op="flush_cache",outcome="ok"' in text


# -- vLLM's OpenAI extras (issue 13) -------------------------------------------------------------
IDS = [72, 101, 108, 108, 111, 44, 32, 84, 105, 100]   # "Hello, Tid" as byte tokens


def test_top_logprobs_keep_every_entry(oai, llm, model_name):
    """Byte tokens 0x80..0xff all decode to U+FFFD alone: keyed by text, 20 asked gave fewer."""
    ref = llm.generate([IDS], SamplingParams(max_tokens=12, temperature=0, logprobs=20, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    c = oai.completions.create(model=model_name, prompt=IDS, max_tokens=12, temperature=0, logprobs=20,
                               extra_body={"ignore_eos": True}).choices[0]
    assert all(len(top) == 20 for top in c.logprobs.top_logprobs)
    for top, want in zip(c.logprobs.top_logprobs, ref.top_logprobs):   # no entry lost, none with another's value
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(sorted(top.values()), sorted(want.values())))
        for key, lp in top.items():
            if key.startswith("token_id:"):   # the later of two tokens that decode alike
                assert math.isclose(lp, want[int(key.removeprefix("token_id:"))], abs_tol=1e-4)
    chat = oai.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "\xe9\xe8"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=20)
    assert all(len(t.top_logprobs) == 20 for t in chat.choices[0].logprobs.content)


def test_return_tokens_as_token_ids(oai, model_name):
    c = oai.completions.create(model=model_name, prompt=IDS, max_tokens=6, temperature=0, logprobs=5,
                               extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True}).choices[0]
    assert c.logprobs.tokens == [f"token_id:{t}" for t in c.model_extra["token_ids"]]
    assert all(len(top) == 5 and all(k.startswith("token_id:") for k in top) for top in c.logprobs.top_logprobs)
    assert c.model_extra["prompt_token_ids"] == IDS
    chat = oai.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    content = chat.choices[0].logprobs.content
    assert [t.token for t in content] == [f"token_id:{t}" for t in chat.choices[0].model_extra["token_ids"]]
    assert all(x.token.startswith("token_id:") for t in content for x in t.top_logprobs)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_logprobs_is_lm_eval_loglikelihood(oai, llm, model_name, max_tokens):
    """What lm-eval's local-completions reads: prompt tokens with their logprobs, the first null."""
    ref = llm.generate([IDS], SamplingParams(max_tokens=max(max_tokens, 1), temperature=0, prompt_logprobs=1,
                                             logprobs=1), use_tqdm=False)[0]
    c = oai.completions.create(model=model_name, prompt=IDS, max_tokens=max_tokens, temperature=0, logprobs=1,
                               echo=True).choices[0]
    lp = c.logprobs
    n = len(IDS) + max_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for got, want in zip(lp.token_logprobs[1:len(IDS)], ref.prompt_token_logprobs[1:]):
        assert math.isclose(got, want, abs_tol=1e-4)
    assert c.text.startswith(llm.tokenizer.decode(IDS)) and lp.text_offset[0] == 0
    greedy = [max(t.values()) for t in lp.top_logprobs[1:len(IDS)]]
    assert all(g >= x - 1e-6 for g, x in zip(greedy, lp.token_logprobs[1:len(IDS)]))
    if max_tokens == 0:
        assert c.text == llm.tokenizer.decode(IDS) and c.finish_reason == "length"
    else:
        assert math.isclose(lp.token_logprobs[-1], ref.outputs[0].token_logprobs[0], abs_tol=1e-4)


def test_echo_streams_like_non_streaming(oai, model_name):
    kw = dict(model=model_name, prompt=IDS, max_tokens=8, temperature=0, logprobs=2, echo=True,
              extra_body={"ignore_eos": True})
    full = oai.completions.create(**kw).choices[0]
    text, tokens, lps, offsets = "", [], [], []
    for chunk in oai.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert text == full.text and tokens == full.logprobs.tokens and offsets == full.logprobs.text_offset
    assert lps[0] is None
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(lps[1:], full.logprobs.token_logprobs[1:]))


def test_prompt_logprobs_field(oai, llm, model_name):
    ref = llm.generate([IDS], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3), use_tqdm=False)[0]
    c = oai.completions.create(model=model_name, prompt=[IDS, IDS], max_tokens=2, temperature=0,
                               extra_body={"prompt_logprobs": 3})
    for choice in c.choices:   # a token-id batch: one choice per prompt, each with its prompt logprobs
        pl = choice.model_extra["prompt_logprobs"]
        assert len(pl) == len(IDS) and pl[0] is None
        for entry, tid, want, top in zip(pl[1:], IDS[1:], ref.prompt_token_logprobs[1:], ref.prompt_top_logprobs[1:]):
            assert math.isclose(entry[str(tid)]["logprob"], want, abs_tol=1e-4)
            assert set(entry) == {str(tid), *(str(t) for t in top)}
            assert entry[str(tid)]["decoded_token"] == llm.tokenizer.decode([tid])
    chat = oai.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       temperature=0, extra_body={"prompt_logprobs": 0})
    pl = chat.model_extra["prompt_logprobs"]
    assert pl[0] is None and all(len(e) == 1 for e in pl[1:]) and len(pl) == chat.usage.prompt_tokens


def test_penalties_and_include_stop_str_match_offline(oai, llm, model_name):
    pen = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.7)
    ref = llm.generate([IDS], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, **pen),
                       use_tqdm=False)[0].outputs[0]
    plain = llm.generate([IDS], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert ref.token_ids != plain.token_ids   # the penalties change this output
    c = oai.completions.create(model=model_name, prompt=IDS, max_tokens=24, temperature=0,
                               presence_penalty=0.5, frequency_penalty=0.7,
                               extra_body={"ignore_eos": True, "repetition_penalty": 1.3,
                                           "return_token_ids": True}).choices[0]
    assert c.model_extra["token_ids"] == ref.token_ids
    stop = plain.text[5:7]
    for stream in (False, True):
        kw = dict(model=model_name, prompt=IDS, max_tokens=24, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
        if stream:
            text = "".join(ch.choices[0].text for ch in oai.completions.create(stream=True, **kw) if ch.choices)
        else:
            text = oai.completions.create(**kw).choices[0].text
        cut = plain.text.find(stop)
        assert text == plain.text[:cut + len(stop)], (stream, stop)


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"guided_json": {}}, "guided_json"),
    ({"no_such_field": 1}, "no_such_field"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"echo": True}, "echo"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_unsupported_fields_are_refused_by_name(server, extra, param):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_accepted_and_ignored_fields(server):
    body = {"prompt": "x", "max_tokens": 2, "user": "u", "metadata": {"k": "v"}, "store": False,
            "service_tier": "auto", "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "parallel_tool_calls": False}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
