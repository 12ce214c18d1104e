"""The control plane over HTTP with streaming clients: pause(abort) mid-generation, requests
while paused (queued, or 503 with --reject-while-paused), a disconnected client aborts its
request, and 1,000 rounds of control calls racing generation."""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest


async def _stream_completion(client: httpx.AsyncClient, url: str, body: dict, first_token: asyncio.Event | None = None):
    """Stream /v1/completions; returns (status, request id, token ids, finish_reason, error)."""
    ids: list[int] = []
    rid = finish = error = None
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return r.status_code, None, ids, None, (await r.aread()).decode()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                error = ev["error"]
                continue
            rid = ev["id"]
            for c in ev["choices"]:
                ids += c.get("token_ids", [])
                if c["finish_reason"]:
                    finish = c["finish_reason"]
            if ids and first_token is not None:
                first_token.set()
    return 200, rid, ids, finish, error


LONG = {"prompt": "tell me a long story", "max_tokens": 400, "temperature": 0.8, "ignore_eos": True,
        "return_token_ids": True}


async def test_pause_abort_with_20_streams(server):
    """max_num_seqs=8: the 8 running return their partial tokens exactly as streamed, the 12
    waiting return finish_reason=abort with no tokens; requests while paused wait for resume."""
    async with httpx.AsyncClient(timeout=120) as client:
        started = [asyncio.Event() for _ in range(20)]
        tasks = [asyncio.create_task(_stream_completion(client, server.url, {**LONG, "request_id": f"p-{i}"},
                                                        started[i])) for i in range(20)]
        deadline = time.monotonic() + 60
        while sum(e.is_set() for e in started) < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert sum(e.is_set() for e in started) == 8
        r = await client.post(server.url + "/v1/pause", json={"mode": "abort"})
        assert r.status_code == 200, r.text
        pause = r.json()
        assert pause["state"] == "paused"
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        engine_counts = {a["request_id"]: a["num_output_tokens"] for a in pause["aborted"]}
        assert len(engine_counts) == 20
        running = [res for res in results if res[2]]
        waiting = [res for res in results if not res[2]]
        assert len(running) == 8 and len(waiting) == 12
        for status, rid, ids, finish, error in results:
            assert status == 200 and error is None
            assert finish == "abort"
            assert len(ids) == engine_counts[rid]   # exactly what the engine had, nothing lost
        # While paused a new request is queued, not lost; it completes after resume.
        queued = asyncio.create_task(client.post(server.url + "/v1/completions", json={
            "prompt": "after", "max_tokens": 5, "ignore_eos": True}))
        await asyncio.sleep(0.5)
        assert not queued.done()
        assert (await client.get(server.url + "/v1/is_paused")).json()["is_paused"] is True
        r = await client.post(server.url + "/v1/resume")
        assert r.json()["state"] == "serving"
        done = await asyncio.wait_for(queued, 60)
        assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length"
        after = await asyncio.gather(*[_stream_completion(client, server.url, {**LONG, "max_tokens": 8})
                                       for _ in range(4)])
        assert all(res[0] == 200 and res[3] == "length" and len(res[2]) == 8 for res in after)
        st = (await client.get(server.url + "/v1/state")).json()
        assert st["kv_blocks_used"] == 0 and st["num_running"] == 0


async def test_disconnected_stream_aborts_its_request(server):
    async with httpx.AsyncClient(timeout=60) as client:
        started = asyncio.Event()
        task = asyncio.create_task(_stream_completion(client, server.url, {**LONG, "request_id": "gone-1"}, started))
        await asyncio.wait_for(started.wait(), 30)
        await client.post(server.url + "/v1/pause", json={"mode": "keep"})  # frozen in the engine, KV kept
        st = (await client.get(server.url + "/v1/state")).json()
        assert st["num_running"] == 1
        task.cancel()                      # the client goes away
        await asyncio.gather(task, return_exceptions=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = (await client.get(server.url + "/v1/state")).json()
            if st["num_running"] == 0 and st["num_waiting"] == 0:
                break
            await asyncio.sleep(0.05)
        assert st["num_running"] == 0 and st["kv_blocks_used"] == 0, st
        await client.post(server.url + "/v1/resume")


async def test_disconnected_non_streaming_client_aborts(server):
    async with httpx.AsyncClient(timeout=60) as client:
        await client.post(server.url + "/v1/pause", json={"mode": "keep"})
        task = asyncio.create_task(client.post(server.url + "/v1/completions",
                                               json={**LONG, "request_id": "gone-2"}))
        deadline = time.monotonic() + 10
        while (await client.get(server.url + "/v1/state")).json()["num_held"] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        deadline = time.monotonic() + 10
        while (st := (await client.get(server.url + "/v1/state")).json())["num_held"]:
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.05)
        await client.post(server.url + "/v1/resume")


async def test_control_calls_race_generation_1000_rounds(server):
    """Every control call answers (none times out), every request gets its answer."""
    stop = asyncio.Event()
    sent = answered = 0
    bad: list = []

    async def worker(client: httpx.AsyncClient, k: int) -> None:
        nonlocal sent, answered
        i = 0
        while not stop.is_set():
            i += 1
            sent += 1
            body = {"prompt": f"race {k} {i}", "max_tokens": 4, "ignore_eos": True, "return_token_ids": True}
            if i % 2:
                status, _, ids, finish, error = await _stream_completion(client, server.url, body)
            else:
                r = await client.post(server.url + "/v1/completions", json=body)
                status, error = r.status_code, None
                finish = r.json()["choices"][0]["finish_reason"] if status == 200 else r.text
            answered += 1
            if status != 200 or error is not None or finish not in ("length", "abort"):
                bad.append((status, finish, error))

    rng = random.Random(0)
    ops = [("POST", "/v1/pause", {"mode": "abort"}), ("POST", "/v1/pause", {"mode": "keep"}),
           ("POST", "/v1/pause", {"mode": "retract"}), ("POST", "/v1/pause", {"mode": "drain", "timeout_s": 0.05}),
           ("GET", "/v1/state", None), ("POST", "/v1/flush_cache", None), ("GET", "/v1/is_paused", None),
           ("POST", "/v1/abort_requests", {"abort_all": True})]
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=30, limits=limits) as gen_client, \
            httpx.AsyncClient(timeout=30) as ctl:
        workers = [asyncio.create_task(worker(gen_client, k)) for k in range(8)]
        t0 = time.monotonic()
        for round_ in range(1000):
            method, path, body = rng.choice(ops)
            r = await ctl.request(method, server.url + path, json=body)
            assert r.status_code == 200, (round_, path, r.text)
            r = await ctl.post(server.url + "/v1/resume")
            assert r.status_code == 200 and r.json()["state"] == "serving", r.text
        elapsed = time.monotonic() - t0
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 60)
    assert not bad, bad[:5]
    assert sent == answered and sent > 50
    print(f"1000 control rounds in {elapsed:.1f}s with {sent} racing requests")


@pytest.fixture(scope="module")
def rejecting_server(server_model, make_server):
    s = make_server(server_model, "--max-num-seqs", "4", "--reject-while-paused")
    yield s
    s.stop()


async def test_reject_while_paused_is_503(rejecting_server):
    s = rejecting_server
    async with httpx.AsyncClient(timeout=60) as client:
        s.control("/v1/pause", {"mode": "abort"})
        body = {"prompt": "x", "max_tokens": 4}
        r = await client.post(s.url + "/v1/completions", json=body)
        assert r.status_code == 503 and "paused" in r.json()["error"]["message"]
        assert r.headers.get("retry-after")
        status, *_ , err = await _stream_completion(client, s.url, body)
        assert status == 503, err
        r = await client.post(s.url + "/generate", json={"input_ids": [1, 2], "sampling_params": {"max_tokens": 2}})
        assert r.status_code == 503
        s.control("/v1/resume")
        r = await client.post(s.url + "/v1/completions", json=body)
        assert r.status_code == 200
    text = httpx.get(s.url + "/metrics").text
    assert 'finish_reason="rejected"' in text
