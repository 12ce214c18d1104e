"""vLLM's RL routes on `tidal serve`, field by field: pause / resume / is_paused, sleep / wake_up /
is_sleeping, reset_prefix_cache, abort_requests, get_world_size, weight_info /
update_weight_version, and token-in token-out /inference/v1/generate."""
from __future__ import annotations

import json
import math
import threading

import httpx
import pytest

from tidal import LLM, SamplingParams

PROMPT = [5, 6, 7, 8, 9]
LONG = {"prompt": "tell me a long story", "max_tokens": 400, "ignore_eos": True, "temperature": 0.8}


@pytest.fixture(scope="module")
def srv(server_model, make_server):
    s = make_server(server_model, "--max-num-seqs", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm(server_model):
    llm = LLM(server_model, block_size=4, num_kv_blocks=1024, max_num_seqs=8)
    yield llm
    llm.shutdown()


def post(srv, path: str, body: dict | None = None, params: dict | None = None) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, params=params, headers=srv.admin_headers(), timeout=60)


def get(srv, path: str) -> dict:
    r = httpx.get(srv.url + path, headers=srv.admin_headers(), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def generate(srv, **sp) -> dict:
    body = {"token_ids": PROMPT, "sampling_params": {"max_tokens": 8, "temperature": 0, "ignore_eos": True, **sp}}
    r = httpx.post(srv.url + "/inference/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


class Streaming:
    """A long completion streamed in a thread; `started` is set once tokens arrive."""

    def __init__(self, srv) -> None:
        self.started, self.reasons = threading.Event(), []
        self.thread = threading.Thread(target=self._run, args=(srv,), daemon=True)
        self.thread.start()
        assert self.started.wait(60), "the stream produced no token"

    def _run(self, srv) -> None:
        with httpx.stream("POST", srv.url + "/v1/completions", json={**LONG, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.started.set()
                    for c in json.loads(line[6:])["choices"]:
                        if c.get("finish_reason"):
                            self.reasons.append(c["finish_reason"])

    def join(self) -> list[str]:
        self.thread.join(60)
        return self.reasons


def test_pause_abort_resume(srv):
    assert get(srv, "/is_paused") == {"is_paused": False}
    stream = Streaming(srv)
    r = post(srv, "/pause")   # vLLM's default: mode=abort, clear_cache=true
    assert r.status_code == 200 and r.json()["status"] == "paused" and r.json()["mode"] == "abort"
    assert len(r.json()["detail"]["aborted"]) == 1
    assert stream.join() == ["abort"]
    assert get(srv, "/is_paused") == {"is_paused": True}
    r = post(srv, "/resume")
    assert r.status_code == 200 and r.json()["status"] == "resumed"
    assert get(srv, "/is_paused") == {"is_paused": False}


def test_pause_keep_and_wait(srv):
    stream = Streaming(srv)
    r = post(srv, "/pause", params={"mode": "keep"})
    assert r.status_code == 200 and len(r.json()["detail"]["kept"]) == 1
    assert post(srv, "/resume").status_code == 200
    r = post(srv, "/pause", params={"mode": "wait"})   # returns once the kept stream has finished
    assert r.status_code == 200 and r.json()["mode"] == "wait"
    assert stream.join() == ["length"]
    assert post(srv, "/resume").status_code == 200
    r = post(srv, "/pause", params={"wait_for_inflight_requests": "true"})   # vLLM's older spelling
    assert r.status_code == 200 and r.json()["mode"] == "wait"
    assert post(srv, "/resume").status_code == 200


def test_pause_and_sleep_refuse_bad_queries(srv):
    cases = [("/pause", {"mode": "retract"}, "mode"), ("/pause", {"clear_cache": "maybe"}, "clear_cache"),
             ("/sleep", {"level": 3}, "level"), ("/sleep", {"tags": "gpu"}, "tags.0"),
             ("/sleep", {"level": 1, "tags": "weights"}, "tags"), ("/wake_up", {"tags": "x"}, "tags.0"),
             ("/pause", {"mode": "keep", "wait_for_inflight_requests": "true"}, "wait_for_inflight_requests")]
    for path, params, param in cases:
        r = post(srv, path, params=params)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, params, r.text)
    assert get(srv, "/is_paused") == {"is_paused": False}


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_level_and_wake_up(srv, level):
    before = generate(srv)["choices"][0]["token_ids"]
    r = post(srv, "/sleep", params={"level": level})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "sleeping" and r.json()["level"] == level
    assert r.json()["detail"]["sleeping"] == ["kv_cache", "weights"]
    assert get(srv, "/is_sleeping") == {"is_sleeping": True} and get(srv, "/is_paused") == {"is_paused": True}
    r = post(srv, "/wake_up", params={"tags": "weights"})   # one tag at a time, as vLLM allows
    assert r.status_code == 200 and r.json()["status"] == "sleeping" and r.json()["detail"]["sleeping"] == ["kv_cache"]
    r = post(srv, "/wake_up")
    assert r.status_code == 200 and r.json()["status"] == "awake"
    assert get(srv, "/is_sleeping") == {"is_sleeping": False} and get(srv, "/is_paused") == {"is_paused": False}
    assert generate(srv)["choices"][0]["token_ids"] == before   # level 2 re-read the checkpoint


def test_sleep_tags_while_paused_stays_paused(srv):
    assert post(srv, "/pause").status_code == 200
    r = post(srv, "/sleep", params={"tags": "kv_cache"})
    assert r.status_code == 200 and r.json()["detail"]["sleeping"] == ["kv_cache"] and r.json()["level"] is None
    assert post(srv, "/wake_up", params={"tags": "kv_cache"}).json()["status"] == "awake"
    assert get(srv, "/is_paused") == {"is_paused": True}   # paused by the caller: still paused
    assert post(srv, "/resume").status_code == 200


def test_reset_prefix_cache_abort_requests_world_size(srv):
    r = post(srv, "/reset_prefix_cache")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["detail"]["flushed"] is True
    stream = Streaming(srv)
    r = post(srv, "/abort_requests", {})   # no ids: everything in flight
    assert r.status_code == 200 and r.json()["status"] == "aborted" and r.json()["aborted"] == 1
    assert stream.join() == ["abort"]
    r = post(srv, "/abort_requests", {"request_ids": ["no-such-request"]})
    assert r.status_code == 200 and r.json()["aborted"] == 0
    assert post(srv, "/abort_requests", {"request_ids": "x"}).json()["error"]["param"] == "request_ids"
    assert get(srv, "/get_world_size") == {"world_size": 1}
    assert get(srv, "/is_paused") == {"is_paused": False}   # aborting does not pause


def test_weight_version_label(srv):
    info = get(srv, "/weight_info")
    assert info["weight_version"] == str(info["engine_weight_version"])
    r = post(srv, "/update_weight_version", {"new_version": "policy-3"})
    assert r.status_code == 200 and r.json() == {"success": True, "new_version": "policy-3"}
    assert get(srv, "/weight_info") == {"weight_version": "policy-3",
                                        "engine_weight_version": info["engine_weight_version"]}
    r = post(srv, "/update_weight_version", {"new_version": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "new_version"


def test_generate_tokens_in_tokens_out(srv, llm):
    ref = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3,
                                                prompt_logprobs=2), use_tqdm=False)[0]
    out = generate(srv, logprobs=3, prompt_logprobs=2)
    assert set(out) == {"request_id", "choices", "prompt_logprobs", "kv_transfer_params"}
    assert out["kv_transfer_params"] is None and out["request_id"].startswith("gen-")
    c = out["choices"][0]
    assert c["index"] == 0 and c["finish_reason"] == "length" and c["token_ids"] == ref.outputs[0].token_ids
    content = c["logprobs"]["content"]
    assert [e["token"] for e in content] == [f"token_id:{t}" for t in c["token_ids"]]
    for e, lp, top in zip(content, ref.outputs[0].token_logprobs, ref.outputs[0].top_logprobs):
        assert math.isclose(e["logprob"], lp, abs_tol=1e-4)
        assert [x["token"] for x in e["top_logprobs"]] == [f"token_id:{t}" for t in top]
    pl = out["prompt_logprobs"]
    assert len(pl) == len(PROMPT) and pl[0] is None
    for entry, tid, lp in zip(pl[1:], PROMPT[1:], ref.prompt_token_logprobs[1:]):
        assert math.isclose(entry[str(tid)]["logprob"], lp, abs_tol=1e-4)
        assert entry[str(tid)]["decoded_token"] == f"token_id:{tid}"
        assert 1 <= len(entry) <= 3


def test_generate_stream_equals_non_stream(srv):
    full = generate(srv, max_tokens=12, n=2, seed=3, temperature=0.9)
    ids: dict[int, list[int]] = {}
    reasons = {}
    body = {"token_ids": PROMPT, "stream": True, "stream_options": {"include_usage": True},
            "sampling_params": {"max_tokens": 12, "n": 2, "seed": 3, "temperature": 0.9, "ignore_eos": True}}
    usage = None
    with httpx.stream("POST", srv.url + "/inference/v1/generate", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                usage = ev.get("usage", usage)
                for c in ev["choices"]:
                    ids.setdefault(c["index"], []).extend(c["token_ids"])
                    if c["finish_reason"]:
                        reasons[c["index"]] = c["finish_reason"]
    assert ids == {c["index"]: c["token_ids"] for c in full["choices"]}
    assert reasons == {0: "length", 1: "length"} and usage["completion_tokens"] == 24


def test_generate_refuses_what_it_does_not_do(srv):
    for body, param in [({"sampling_params": {"bogus": 1}}, "sampling_params.bogus"),
                        ({"sampling_params": {"detokenize": False}}, "sampling_params.detokenize"),
                        ({"priority": 1}, "priority"), ({"cache_salt": "s"}, "cache_salt"),
                        ({"kv_transfer_params": {}}, "kv_transfer_params"), ({"token_ids": []}, "token_ids"),
                        ({"sampling_params": {"max_tokens": 0, "n": 2}}, "sampling_params.n"),
                        ({"sampling_params": {"min_tokens": 9, "max_tokens": 4}}, "sampling_params.min_tokens"),
                        ({"token_ids": [10**6]}, "token_ids"), ({"model": "nope"}, "model")]:
        r = httpx.post(srv.url + "/inference/v1/generate", json={"token_ids": PROMPT, **body}, timeout=30)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, (body, r.text)
