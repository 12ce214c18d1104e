"""Regressions of issue 10's HTTP items, through real HTTP against `tidal serve`: body and prompt
bounds that keep the event loop answering (6), control endpoints and the admin key (8),
request ids (11), engine death (13), strict field types (15), JSON errors (16), the OpenAPI
document (17), HEAD and trailing slashes (18), metrics (19), and pause's query form."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time

import httpx
import pytest

from tidal.config import EngineConfig
from tidal.engine.messages import EngineDead, EngineInvalidInput
from tidal.server.api import ServerSettings, create_app

LONG = {"prompt": "tell me a long story", "max_tokens": 400, "ignore_eos": True}


@pytest.fixture(scope="module")
def big(server_model, make_server):
    """64 sequences per batch (n=64 fits) and a 4 MB body limit."""
    s = make_server(server_model, "--max-num-seqs", "64", "--max-body-bytes", str(4 * 2**20))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def user_keyed(server_model, make_server):
    """--api-key only: control endpoints have no key of their own."""
    s = make_server(server_model, "--log-level", "info", api_key="user-key")
    yield s
    s.stop()


async def _health_latencies(url: str, done: asyncio.Event) -> list[float]:
    """How long each /health took, polled back to back until `done` (bounded by its caller)."""
    out: list[float] = []
    async with httpx.AsyncClient(timeout=60) as client:
        while not done.is_set():
            t0 = time.perf_counter()
            r = await client.get(url + "/health")
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200
            await asyncio.sleep(0.01)
    return out


# -- 6: bounded bodies, cheap checks first, nothing big on the event loop ----------------------
def test_body_over_the_limit_is_413_naming_it(big):
    body = b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}'
    r = httpx.post(big.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413, r.text
    assert str(4 * 2**20) in r.json()["error"]["message"] and "--max-body-bytes" in r.json()["error"]["message"]

    def chunks():   # no Content-Length: the limit is enforced as the body arrives
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"x" * 2**20
        yield b'"}'
    r = httpx.post(big.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413, r.text
    assert httpx.get(big.url + "/health", timeout=10).status_code == 200


async def test_huge_prompt_is_refused_before_tokenising_and_health_answers(big):
    """2 M characters (the tiny tokenizer takes ~7 s for them): refused on its length alone,
    while /health keeps answering."""
    done = asyncio.Event()
    poll = asyncio.create_task(_health_latencies(big.url, done))
    try:
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.sleep(0.1)
            r = await client.post(big.url + "/v1/completions", json={"prompt": "hello world " * 170_000,
                                                                     "max_tokens": 4})
    finally:
        done.set()
    lat = await asyncio.wait_for(poll, 60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert "characters" in r.json()["error"]["message"] and "max_model_len=512" in r.json()["error"]["message"]
    assert lat and max(lat) < 2.0, max(lat)


def test_long_prompt_under_the_character_bound_is_tokenised_and_checked(big):
    r = httpx.post(big.url + "/generate", json={"text": "y" * 20_000}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "text", r.text
    assert "max_model_len=512" in r.json()["error"]["message"]
    r = httpx.post(big.url + "/v1/completions", json={"prompt": [5] * 600, "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


async def test_a_large_response_is_built_off_the_loop_and_complete(big):
    """n=64 samples x 40 tokens x 20 top logprobs (over the inline threshold: built in a worker
    thread). The answer is whole, and /health keeps answering meanwhile."""
    body = {"prompt": [5, 6, 7], "n": 64, "max_tokens": 40, "logprobs": 20, "ignore_eos": True,
            "temperature": 1.0, "seed": 1}
    done = asyncio.Event()
    poll = asyncio.create_task(_health_latencies(big.url, done))
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            r = await client.post(big.url + "/v1/completions", json=body)
    finally:
        done.set()
    lat = await asyncio.wait_for(poll, 60)
    assert r.status_code == 200, r.text[:300]
    choices = r.json()["choices"]
    assert sorted(c["index"] for c in choices) == list(range(64))
    for c in choices:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 40
        assert all(1 <= len(t) <= 21 for t in lp["top_logprobs"])   # keys are token strings: some coincide
    assert lat and max(lat) < 5.0, sorted(lat)[-5:]


# -- 8: control needs the admin key --------------------------------------------------------------
def test_api_key_alone_does_not_open_control(user_keyed):
    h = user_keyed.headers()
    for method, path, body in [("POST", "/v1/pause", {"mode": "abort"}), ("GET", "/v1/state", None),
                               ("POST", "/v1/update_weights", {"path": "/tmp"})]:
        r = httpx.request(method, user_keyed.url + path, json=body, headers=h, timeout=30)
        assert r.status_code == 403, (path, r.text)
        assert "admin key" in r.json()["error"]["message"] and "--admin-key" in r.json()["error"]["message"]
    r = httpx.post(user_keyed.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=h, timeout=30)
    assert r.status_code == 200
    assert "control endpoints" in user_keyed.output() and "disabled" in user_keyed.output()


async def test_wrong_admin_key_says_an_admin_key_is_required():
    app = create_app(EngineConfig(model=None, device="cpu"), ServerSettings(api_key="user", admin_key="admin"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        for key in ("nope", "user"):
            r = await client.post("/v1/pause", headers={"Authorization": f"Bearer {key}"})
            err = r.json()["error"]
            assert r.status_code == 401 and "admin key is required" in err["message"], r.text
            assert "invalid or missing API key" not in err["message"]


def test_unguarded_control_is_warned_about(server):
    assert "control endpoints are unguarded" in server.output()


async def test_control_beyond_loopback_needs_an_admin_key():
    """Settings as `--host 0.0.0.0` without keys give: control refused, inference open (the
    engine is not started: the refusal comes before it would be used)."""
    app = create_app(EngineConfig(model=None, device="cpu"), ServerSettings(host="0.0.0.0"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        r = await client.post("/v1/pause", json={"mode": "abort"})
        assert r.status_code == 403 and "--admin-key" in r.json()["error"]["message"], r.text
        assert (await client.get("/v1/models")).status_code == 200


# -- 11: request ids -------------------------------------------------------------------------------
def test_server_request_ids_are_random_and_reserved(server):
    ids = []
    for path, body, key in [("/v1/completions", {"prompt": "a", "max_tokens": 1}, "id"),
                            ("/v1/completions", {"prompt": "a", "max_tokens": 1}, "id"),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                      "max_tokens": 1}, "id"),
                            ("/generate", {"input_ids": [5], "sampling_params": {"max_tokens": 1}}, "request_id")]:
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 200, r.text
        ids.append(r.json()[key])
    assert all(re.fullmatch(r"(cmpl|chatcmpl|gen)-[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    # A client cannot claim an id of the server's shape, so it can never take one from another user.
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "a", "max_tokens": 1,
                                                        "request_id": "cmpl-" + "0" * 32}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "request_id", r.text


async def test_a_clash_of_client_ids_fails_only_the_second_client(server):
    async with httpx.AsyncClient(timeout=60) as client:
        first = asyncio.create_task(client.post(server.url + "/v1/completions",
                                                json={**LONG, "request_id": "mine"}))
        deadline = time.monotonic() + 30
        while (await client.get(server.url + "/v1/state")).json()["num_running"] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # Held in flight (pause keep) so that it cannot finish before the clash, however fast decode is.
        paused = await client.post(server.url + "/v1/pause", json={"mode": "keep"})
        assert paused.status_code == 200 and paused.json()["kept"], paused.text  # still in flight
        r = await client.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                                                   "request_id": "mine"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "request_id", r.text
        assert (await client.post(server.url + "/v1/resume")).status_code == 200
        other = await client.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert other.status_code == 200          # users without an id are never affected
        r1 = await asyncio.wait_for(first, 60)
        assert r1.status_code == 200 and r1.json()["id"] == "mine"
        assert r1.json()["choices"][0]["finish_reason"] == "length"


# -- 13: engine death is 503 ----------------------------------------------------------------------
def test_engine_errors_map_by_type():
    from tidal.server.service import Fields as _Fields
    from tidal.server.errors import engine_error
    e = engine_error(EngineInvalidInput("n", 100, "n <= max_num_seqs=64"), _Fields("input_ids", "sampling_params.").param)
    assert (e.status, e.param) == (400, "sampling_params.n")
    e = engine_error(EngineInvalidInput("prompt", 9000, "fewer tokens than the KV pool"), _Fields("messages").param)
    assert (e.status, e.param) == (400, "messages")
    e = engine_error(EngineInvalidInput("checksums", "x", "64 hex digits"))
    assert (e.status, e.param) == (400, "checksums")
    assert engine_error(EngineDead("engine core process exited (exit code -9)")).status == 503


def test_internal_errors_are_logged(caplog):
    from tidal.server.errors import engine_error
    with caplog.at_level(logging.ERROR, logger="tidal.server"):
        e = engine_error(RecursionError("maximum recursion depth exceeded"))
    assert e.status == 500 and "RecursionError" in caplog.text


# -- 15: strict types ------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": [True, False], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 2.0}, "n"),
    ("/generate", {"input_ids": [5], "timeout_s": "1"}, "timeout_s"),
    ("/generate", {"input_ids": [5], "timeout_s": False}, "timeout_s"),
    ("/generate", {"input_ids": [5], "sampling_params": {"max_tokens": "3"}}, "sampling_params.max_tokens"),
    ("/v1/pause", {"timeout_s": "1", "mode": "drain"}, "timeout_s"),
])
def test_known_fields_are_checked_strictly(server, path, body, field):
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.text


# -- 16: JSON errors and field names -------------------------------------------------------------
def test_json_errors_say_what_is_wrong(server):
    url, h = server.url + "/v1/completions", {"content-type": "application/json"}
    err = httpx.post(url, content=b'{"prompt": "x",, }', headers=h, timeout=30).json()["error"]
    assert err["param"] == "body" and "Expecting" in err["message"], err
    err = httpx.post(url, content=b'{"prompt": "\xff\xfe"}', headers=h, timeout=30).json()["error"]
    assert err["param"] == "body" and "UTF-8" in err["message"], err
    err = httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers=h, timeout=30).json()["error"]
    assert err["param"] == "body" and "nests too deeply" in err["message"], err


def test_generate_errors_name_input_ids_and_the_real_timeout(server):
    r = httpx.post(server.url + "/generate", json={"input_ids": [999_999]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_ids", r.text
    r = httpx.post(server.url + "/generate", json={"input_ids": [5] * 500, "sampling_params": {"max_tokens": 100}},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_ids", r.text
    r = httpx.post(server.url + "/generate", json={"input_ids": [5], "timeout_s": 0.1, "sampling_params": {
        "max_tokens": 400, "ignore_eos": True}}, timeout=30)
    assert r.status_code == 504 and "0.1s" in r.json()["error"]["message"], r.text


# -- 17: the OpenAPI document says what the server answers -----------------------------------------
def test_openapi_documents_error_statuses_and_rules(server):
    doc = httpx.get(server.url + "/openapi.json", timeout=30).json()
    for path, method, statuses in [("/v1/completions", "post", {"400", "401", "404", "405", "409", "413", "503", "504"}),
                                   ("/v1/pause", "post", {"400", "401", "403", "409", "413", "503", "504"})]:
        responses = doc["paths"][path][method]["responses"]
        assert statuses <= set(responses), (path, sorted(responses))
        ref = responses["400"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
        assert "422" not in responses
    assert "exactly one of" in doc["components"]["schemas"]["GenerateRequest"]["description"].lower()
    assert "exactly one of" in doc["components"]["schemas"]["AbortRequest"]["description"].lower()


# -- 18: HEAD and trailing slashes -----------------------------------------------------------------
def test_head_health_and_no_slash_redirect(server):
    assert httpx.head(server.url + "/health", timeout=10).status_code == 200
    r = httpx.post(server.url + "/v1/pause/", json={"mode": "keep"}, timeout=10, follow_redirects=False)
    assert r.status_code == 404, (r.status_code, r.headers)
    assert server.control("/v1/is_paused", method="GET")["is_paused"] is False


# -- 19: metrics -----------------------------------------------------------------------------------
def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_http_requests_and_disconnects_are_counted(server):
    async with httpx.AsyncClient(timeout=60) as client:
        before = (await client.get(server.url + "/metrics")).text
        assert (await client.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})).status_code == 200
        assert (await client.post(server.url + "/v1/completions", json={"prompt": ""})).status_code == 400
        # a non-streaming and a streaming client that go away mid-generation
        tasks = [asyncio.create_task(client.post(server.url + "/v1/completions", json=LONG))]

        async def stream() -> None:
            async with client.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}) as r:
                async for _ in r.aiter_lines():
                    pass
        tasks.append(asyncio.create_task(stream()))
        deadline = time.monotonic() + 30
        while (await client.get(server.url + "/v1/state")).json()["num_running"] < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        deadline = time.monotonic() + 10
        while True:
            after = (await client.get(server.url + "/metrics")).text
            aborted = (_metric(after, "tidal_requests_total", finish_reason="abort")
                       - _metric(before, "tidal_requests_total", finish_reason="abort"))
            if aborted >= 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert aborted == 2, aborted
    ok = _metric(after, "tidal_http_requests_total", endpoint="/v1/completions", status="200")
    assert ok - _metric(before, "tidal_http_requests_total", endpoint="/v1/completions", status="200") >= 1
    bad = _metric(after, "tidal_http_requests_total", endpoint="/v1/completions", status="400")
    assert bad - _metric(before, "tidal_http_requests_total", endpoint="/v1/completions", status="400") == 1


# -- pause's query form (issue 11) -----------------------------------------------------------------
def test_pause_query_form_is_honoured(server):
    r = httpx.post(server.url + "/v1/pause?mode=keep", timeout=30)
    try:
        assert r.status_code == 200, r.text
        assert server.control("/v1/is_paused", method="GET")["pause_mode"] == "keep"
    finally:
        server.control("/v1/resume")
    r = httpx.post(server.url + "/v1/pause?mode=keep", json={"mode": "abort"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode", r.text
    r = httpx.post(server.url + "/v1/pause?mode=sideways", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "mode", r.text
    assert server.control("/v1/is_paused", method="GET")["is_paused"] is False


# -- 13: engine death is 503 (last: it kills the `big` server's engine) --------------------------
def test_dead_engine_is_503(big):
    s = big
    os.kill(s.engine_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while httpx.get(s.url + "/health", timeout=10).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for method, path, body in [("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
                               ("POST", "/generate", {"input_ids": [5]}), ("POST", "/v1/pause", {}),
                               ("GET", "/v1/state", None)]:
        r = httpx.request(method, s.url + path, json=body, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "engine_dead", (path, r.text)
