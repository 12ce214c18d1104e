"""POST /generate in SGLang's shape against a real `tidal serve`: request fields (text | input_ids,
single or batch, SGLang's sampling_params names and Tidal's aliases, return_logprob,
logprob_start_len, top_logprobs_num, rid, stream) and the response (text, output_ids, meta_info),
field by field, with the offline LLM as the reference."""
from __future__ import annotations

import json
import math

import httpx
import pytest

from tidal import LLM, SamplingParams

IDS = [72, 101, 108, 108, 111, 33]


@pytest.fixture(scope="module")
def llm(server_model):
    llm = LLM(server_model, block_size=4, num_kv_blocks=1024, max_num_seqs=8)
    yield llm
    llm.shutdown()


def post(server, body: dict, status: int = 200):
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def stream(server, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def close(a: list, b: list, tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=tol) for x, y in zip(a, b))


def test_response_shape_field_by_field(server, llm):
    ref = llm.generate([IDS], SamplingParams(max_tokens=10, temperature=0.0, logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    out = post(server, {"input_ids": IDS, "rid": "sgl-shape", "return_logprob": True, "sampling_params": {
        "max_new_tokens": 10, "temperature": 0, "ignore_eos": True}})
    assert out["output_ids"] == ref.token_ids and out["text"] == ref.text
    meta = out["meta_info"]
    assert meta["id"] == "sgl-shape"
    assert meta["finish_reason"] == {"type": "length", "length": 10}
    assert meta["prompt_tokens"] == len(IDS) and meta["completion_tokens"] == 10
    assert isinstance(meta["cached_tokens"], int) and meta["cached_tokens"] >= 0
    assert meta["weight_version"] == "0" and meta["weight_spans"] == [[0, 0, 10]]
    lps = meta["output_token_logprobs"]
    assert [e[1] for e in lps] == out["output_ids"] and all(e[2] is None for e in lps)
    assert close([e[0] for e in lps], ref.token_logprobs)
    assert "input_token_logprobs" not in meta          # logprob_start_len defaults to -1
    # Tidal's token-API fields stay alongside
    assert out["output_logprobs"] == [e[0] for e in lps] and out["finish_reason"] == "length"
    assert out["weight_version"] == 0 and out["weight_spans"] == [[0, 0, 10]] and out["request_id"] == "sgl-shape"


def test_max_new_tokens_is_honoured_and_max_tokens_is_its_alias(server):
    assert post(server, {"text": "count", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}
                )["meta_info"]["completion_tokens"] == 40
    assert post(server, {"text": "count", "sampling_params": {"max_tokens": 7, "ignore_eos": True}}
                )["meta_info"]["completion_tokens"] == 7
    err = post(server, {"text": "x", "sampling_params": {"max_new_tokens": 4, "max_tokens": 5}}, 400)
    assert err["error"]["param"] == "sampling_params.max_new_tokens" and "max_tokens" in err["error"]["message"]
    err = post(server, {"text": "x", "sampling_params": {"sampling_seed": 1, "seed": 2}}, 400)
    assert err["error"]["param"] == "sampling_params.sampling_seed"


def test_stop_finish_reasons_and_no_stop_trim(server):
    free = post(server, {"input_ids": IDS, "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                               "ignore_eos": True}})
    tok = free["output_ids"][2]
    out = post(server, {"input_ids": IDS, "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                              "stop_token_ids": [tok], "ignore_eos": True}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok}
    assert out["output_ids"][-1] == tok
    word = free["text"][len(post(server, {"input_ids": IDS, "sampling_params": {
        "max_new_tokens": 2, "temperature": 0, "ignore_eos": True}})["text"]):]
    if word.strip():
        stop = word.strip()[:2]
        trimmed = post(server, {"input_ids": IDS, "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                                      "stop": [stop], "ignore_eos": True}})
        kept = post(server, {"input_ids": IDS, "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                                   "stop": [stop], "no_stop_trim": True,
                                                                   "ignore_eos": True}})
        assert trimmed["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
        assert kept["text"] == trimmed["text"] + stop


def test_batch_of_text_and_of_input_ids_with_n(server, llm):
    outs = post(server, {"input_ids": [IDS, [5, 6, 7]], "rid": ["b-0", "b-1"],
                         "sampling_params": {"max_new_tokens": 5, "temperature": 0, "n": 2}})
    assert isinstance(outs, list) and len(outs) == 4
    assert [o["meta_info"]["id"] for o in outs] == ["b-0", "b-0", "b-1", "b-1"]
    assert [o["index"] for o in outs] == [0, 1, 2, 3]
    ref = llm.generate([IDS, [5, 6, 7]], SamplingParams(max_tokens=5, temperature=0.0), use_tqdm=False)
    assert outs[0]["output_ids"] == ref[0].outputs[0].token_ids and outs[2]["output_ids"] == ref[1].outputs[0].token_ids
    texts = post(server, {"text": ["a b", "c d"], "sampling_params": [{"max_new_tokens": 2, "ignore_eos": True},
                                                                       {"max_new_tokens": 3, "ignore_eos": True}]})
    assert [t["meta_info"]["completion_tokens"] for t in texts] == [2, 3]
    one = post(server, {"text": ["only"], "sampling_params": {"max_new_tokens": 1}})
    assert isinstance(one, list) and len(one) == 1          # a batch of one is still a batch
    err = post(server, {"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 1}]}, 400)
    assert err["error"]["param"] == "sampling_params"
    err = post(server, {"text": ["a", "b"], "rid": ["x"]}, 400)
    assert err["error"]["param"] == "rid"


def test_prior_output_tokens_continues_a_seeded_penalized_sample(server):
    sp = {"temperature": 1.0, "sampling_seed": 21, "presence_penalty": 0.8, "frequency_penalty": 0.6,
          "ignore_eos": True}
    full = post(server, {"input_ids": IDS, "sampling_params": {**sp, "max_new_tokens": 12}})["output_ids"]
    cont = post(server, {"input_ids": IDS + full[:5], "prior_output_tokens": 5,
                         "sampling_params": {**sp, "max_new_tokens": 7}})
    assert cont["output_ids"] == full[5:]
    # usage is the request's own: its whole prompt, the tokens it made
    assert cont["meta_info"]["prompt_tokens"] == len(IDS) + 5 and cont["meta_info"]["completion_tokens"] == 7
    assert cont["meta_info"]["weight_spans"] == [[0, 0, 7]]
    fresh = post(server, {"input_ids": IDS + full[:5], "sampling_params": {**sp, "max_new_tokens": 7}})
    assert fresh["output_ids"] != full[5:]        # without the field: a fresh request over prompt + prefix
    # a batch, one count per prompt, streamed
    events = stream(server, {"input_ids": [IDS + full[:3], IDS + full[:8]], "prior_output_tokens": [3, 8],
                             "incremental_streaming_output": True,
                             "sampling_params": [{**sp, "max_new_tokens": 9}, {**sp, "max_new_tokens": 4}]})
    got: dict[int, list[int]] = {0: [], 1: []}
    for ev in events:
        got[ev["index"]].extend(ev["output_ids"])
    assert got == {0: full[3:], 1: full[8:]}


@pytest.mark.parametrize("body,param", [
    ({"input_ids": IDS, "prior_output_tokens": -1}, "prior_output_tokens"),
    ({"input_ids": IDS, "prior_output_tokens": "2"}, "prior_output_tokens"),
    ({"input_ids": IDS, "prior_output_tokens": True}, "prior_output_tokens"),
    ({"input_ids": IDS, "prior_output_tokens": 1.5}, "prior_output_tokens"),
    ({"input_ids": IDS, "prior_output_tokens": len(IDS) + 1}, "prior_output_tokens"),
    ({"input_ids": IDS, "prior_output_tokens": [1]}, "prior_output_tokens"),
    ({"input_ids": [IDS, [1, 2]], "prior_output_tokens": [1]}, "prior_output_tokens"),
    ({"input_ids": [IDS, [1, 2]], "prior_output_tokens": [1, 3]}, "prior_output_tokens.1"),
    ({"input_ids": [IDS, [1, 2]], "prior_output_tokens": 3}, "prior_output_tokens"),
])
def test_bad_prior_output_tokens_is_a_400_naming_the_field(server, body, param):
    err = post(server, {**body, "sampling_params": {"max_new_tokens": 2}}, 400)["error"]
    assert err["param"] == param and "prior_output_tokens" in err["message"], err


def test_top_logprobs_and_prompt_logprobs(server, llm):
    ref = llm.generate([IDS], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=3),
                       use_tqdm=False)[0]
    out = post(server, {"input_ids": IDS, "return_logprob": True, "logprob_start_len": 2, "top_logprobs_num": 3,
                        "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    meta = out["meta_info"]
    inp = meta["input_token_logprobs"]
    assert [e[1] for e in inp] == IDS[2:]
    assert close([e[0] for e in inp], ref.prompt_token_logprobs[2:])
    assert all(isinstance(e[2], str) for e in inp)
    assert len(meta["input_top_logprobs"]) == len(IDS) - 2 and all(len(t) == 3 for t in meta["input_top_logprobs"])
    tops = meta["output_top_logprobs"]
    assert len(tops) == len(out["output_ids"]) and all(len(t) == 3 for t in tops)
    for t, want in zip(tops, ref.outputs[0].top_logprobs):
        assert [e[1] for e in t] == list(want) and close([e[0] for e in t], list(want.values()))
    whole = post(server, {"input_ids": IDS, "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 1}})
    first = whole["meta_info"]["input_token_logprobs"][0]
    assert first[0] is None and first[1] == IDS[0]        # the first prompt token has no prefix
    err = post(server, {"input_ids": IDS, "logprob_start_len": len(IDS)}, 400)
    assert err["error"]["param"] == "logprob_start_len"


def test_scoring_with_max_new_tokens_zero(server, llm):
    ref = llm.generate([IDS], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
    out = post(server, {"input_ids": IDS, "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 0}})
    assert out["output_ids"] == [] and out["meta_info"]["completion_tokens"] == 0
    got = [e[0] for e in out["meta_info"]["input_token_logprobs"][1:]]
    assert close(got, ref.prompt_token_logprobs[1:])


def test_stream_is_cumulative_like_sglang_and_incremental_on_request(server):
    body = {"input_ids": IDS, "return_logprob": True, "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                                          "ignore_eos": True}}
    final = post(server, body)
    events = stream(server, body)
    assert len(events) >= 2
    for a, b in zip(events, events[1:]):                       # each event holds everything so far
        assert b["output_ids"][:len(a["output_ids"])] == a["output_ids"]
    last = events[-1]
    assert last["output_ids"] == final["output_ids"] and last["text"] == final["text"]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert last["meta_info"]["output_token_logprobs"] == final["meta_info"]["output_token_logprobs"]
    assert [e["meta_info"]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    deltas = stream(server, {**body, "incremental_streaming_output": True})
    assert [t for e in deltas for t in e["output_ids"]] == final["output_ids"]
    assert "".join(e["text"] for e in deltas) == final["text"]
    assert [x for e in deltas for x in e["meta_info"]["output_token_logprobs"]] == \
        final["meta_info"]["output_token_logprobs"]


def test_stream_batch_with_n(server):
    body = {"text": ["one", "two"], "sampling_params": {"max_new_tokens": 4, "n": 2, "temperature": 1.0,
                                                        "sampling_seed": 7, "ignore_eos": True}}
    finals = post(server, body)
    last: dict[int, dict] = {}
    for e in stream(server, body):
        last[e["index"]] = e
    assert sorted(last) == [0, 1, 2, 3]
    assert [last[i]["output_ids"] for i in range(4)] == [f["output_ids"] for f in finals]


def test_unknown_and_unsupported_fields_are_refused(server):
    for body, param in [({"text": "x", "image_data": "a.png"}, "image_data"),
                        ({"text": "x", "sampling_params": {"regex": "a+"}}, "sampling_params.regex"),
                        ({"text": "x", "sampling_params": {"json_schema": "{}"}}, "sampling_params.json_schema"),
                        ({"text": "x", "rid": "a", "request_id": "b"}, "rid"),
                        ({"text": "x", "top_logprobs_num": 2, "sampling_params": {"logprobs": 3}}, "top_logprobs_num"),
                        ({"text": "x", "sampling_params": {"min_new_tokens": 5, "max_new_tokens": 2}},
                         "sampling_params.min_new_tokens"),
                        ({"input_ids": [IDS, []]}, "input_ids")]:
        err = post(server, body, 400)["error"]
        assert err["param"] == param or param in err["message"], (body, err)



def test_sampling_params_own_checks_name_the_field(server):
    """What the schema cannot see (an empty stop string) is checked by SamplingParams, whose typed
    error names the field; the reply's param is that field under sampling_params."""
    err = post(server, {"text": "x", "sampling_params": {"stop": [""]}}, 400)["error"]
    assert err["param"] == "sampling_params.stop", err


def test_sampling_fields_reach_the_engine(server):
    base = {"input_ids": IDS, "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}
    greedy = post(server, base)["output_ids"]
    penal = post(server, {**base, "sampling_params": {**base["sampling_params"], "repetition_penalty": 5.0}})
    assert penal["output_ids"] != greedy or len(set(greedy)) == len(greedy)
    a = post(server, {"input_ids": IDS, "sampling_params": {"max_new_tokens": 8, "temperature": 1.0, "top_k": 5,
                                                            "top_p": 0.9, "min_p": 0.01, "sampling_seed": 11}})
    b = post(server, {"input_ids": IDS, "sampling_params": {"max_new_tokens": 8, "temperature": 1.0, "top_k": 5,
                                                            "top_p": 0.9, "min_p": 0.01, "seed": 11}})
    assert a["output_ids"] == b["output_ids"]
    plain = post(server, {"input_ids": IDS, "sampling_params": {"max_new_tokens": 4, "skip_special_tokens": False,
                                                                "spaces_between_special_tokens": False}})
    assert plain["meta_info"]["completion_tokens"] >= 1
