"""Two `tidal serve` replicas behind `tidal router`: surfaces, affinity, fan-out control,
transactional weight updates, and streams that survive a drained or killed replica.

Tests run in file order on one fleet; the last one kills both replicas.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.router.conftest import kill_replica
from tidal.router.upstream import Upstream

PROMPTS = [f"request {i:02d}:" for i in range(64)]
GREEDY = {"max_tokens": 128, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
EXTRA_TOKENS = 400  # the pinned streams: long enough to be in flight when the disturbance lands


async def _stream(client: httpx.AsyncClient, url: str, body: dict, seen: list[int] | None = None,
                  progress: asyncio.Event | None = None, first: asyncio.Event | None = None,
                  headers: dict | None = None) -> dict:
    """One streaming completion: every chunk's token ids, text, final finish_reason and extras."""
    out = {"chunks": [], "text": "", "finish": None, "final": None}
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        out["replica"] = r.headers.get("x-tidal-replica")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            for c in ev["choices"]:
                out["chunks"].append(c.get("token_ids") or [])
                if first is not None and c.get("token_ids"):
                    first.set()
                out["text"] += c["text"]
                if seen is not None:
                    seen[0] += len(c.get("token_ids") or [])
                    if progress is not None and seen[0] >= seen[1]:
                        progress.set()
                if c["finish_reason"] is not None:
                    out["finish"], out["final"] = c["finish_reason"], c
    out["ids"] = [t for ch in out["chunks"] for t in ch]
    return out


def _session_on(router, url: str) -> dict:
    """Headers whose routing key the router has pinned to the replica at `url` (a long stream sent
    with them is certain to be in flight there when the test drains or kills it)."""
    for i in range(16):   # a new key goes to the least loaded replica, ties taken in turn
        headers = {"X-Session-Id": f"pin-{url}-{i}"}
        r = httpx.post(router.url + "/v1/completions", json={"prompt": f"pin {i}", "max_tokens": 1}, headers=headers,
                       timeout=60)
        if r.headers["x-tidal-replica"] == url:
            return headers
    raise AssertionError(f"no routing key landed on {url}")


async def _reference(url: str, prompts: list[str], body: dict) -> list[list[int]]:
    async with httpx.AsyncClient(timeout=120) as client:
        rs = await asyncio.gather(*(client.post(url + "/v1/completions", json={**body, "prompt": p}) for p in prompts))
    return [r.json()["choices"][0]["token_ids"] for r in rs]


def test_surfaces_and_n8_affinity(fleet):
    router, (a, b) = fleet
    c = openai.OpenAI(base_url=router.url + "/v1", api_key="x")
    model = c.models.list().data[0].id
    cmpl = c.completions.create(model=model, prompt="hello", max_tokens=4, temperature=0)
    assert cmpl.choices[0].finish_reason == "length" and cmpl.usage.completion_tokens == 4
    chat = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                     temperature=0)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 4
    parts = [ch.choices[0].text for ch in c.completions.create(model=model, prompt="hello", max_tokens=4,
                                                                temperature=0, stream=True) if ch.choices]
    assert "".join(parts) == cmpl.choices[0].text
    # the token API, and no router-added field leaks to a client that did not ask for it
    g = httpx.post(router.url + "/generate", json={"input_ids": [1, 2, 3], "sampling_params": {
        "max_tokens": 4, "temperature": 0}}, timeout=60).json()
    direct = httpx.post(a.url + "/generate", json={"input_ids": [1, 2, 3], "sampling_params": {
        "max_tokens": 4, "temperature": 0}}, timeout=60).json()
    assert g["output_ids"] == direct["output_ids"] and g["finish_reason"] == "length"
    assert "token_ids" not in httpx.post(router.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                         timeout=60).json()["choices"][0]
    # an n=8 group: all samples on one replica, and only that one saw the prompt
    before = {s.url: s.control("/v1/state", method="GET")["prefix_cache_query_tokens"] for s in (a, b)}
    r = httpx.post(router.url + "/v1/completions", json={"prompt": "group prompt " * 4, "n": 8, "max_tokens": 3,
                                                         "temperature": 1.0, "seed": 3}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 8
    after = {s.url: s.control("/v1/state", method="GET")["prefix_cache_query_tokens"] for s in (a, b)}
    touched = [u for u in before if after[u] != before[u]]
    assert touched == [r.headers["x-tidal-replica"]]
    # the same routing key lands on the same replica
    pinned = {httpx.post(router.url + "/v1/completions", json={"prompt": f"s{i}", "max_tokens": 1},
                         headers={"X-Session-Id": "trainer-7"}, timeout=60).headers["x-tidal-replica"]
              for i in range(4)}
    assert len(pinned) == 1



def _raw_events(body: bytes) -> list[bytes]:
    return [ev for ev in body.split(b"\n\n") if ev]


def test_stream_ends_with_the_last_events_then_done_and_usage_when_asked(fleet):
    router, (a, _) = fleet
    for extra, usage in (({}, False), ({"stream_options": {"include_usage": True}}, True)):
        body = {"prompt": "hello", "max_tokens": 5, "temperature": 0.0, "ignore_eos": True, "stream": True,
                "return_token_ids": True, **extra}
        r = httpx.post(router.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _raw_events(r.content)
        assert events[-1] == b"data: [DONE]" and events.count(b"data: [DONE]") == 1
        parsed = [json.loads(ev[6:]) for ev in events[:-1]]
        if usage:
            assert parsed[-1]["choices"] == [] and parsed[-1]["usage"]["completion_tokens"] == 5
            assert parsed[-1]["usage"]["prompt_tokens"] > 0
            parsed = parsed[:-1]
        assert parsed[-1]["choices"][0]["finish_reason"] == "length"
        assert [t for ev in parsed for c in ev["choices"] for t in c["token_ids"]] == httpx.post(
            a.url + "/v1/completions", json={**body, "stream": False}, timeout=60).json()["choices"][0]["token_ids"]


@pytest.mark.asyncio
async def test_client_that_leaves_mid_stream_ends_its_flight(fleet):
    """The router stops the flight (and so its upstream stream) when the client disconnects."""
    router, _ = fleet
    host, port = router.url.split("//")[1].split(":")
    body = json.dumps({"prompt": "leave", "max_tokens": 400, "temperature": 0.0, "ignore_eos": True,
                       "stream": True}).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    got = b""
    while b"data: {" not in got:  # the first event arrived: the flight is streaming
        chunk = await asyncio.wait_for(reader.read(1 << 16), 60)
        assert chunk, got
        got += chunk
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(router.url + "/v1/state")).json()["in_flight"] == 1
        writer.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (await client.get(router.url + "/v1/state")).json()["in_flight"] and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert (await client.get(router.url + "/v1/state")).json()["in_flight"] == 0
    assert "Exception in ASGI application" not in router.output()

async def test_a_server_without_a_channel_gets_a_connection_per_request(fleet):
    """A router in front of this router: the inner one answers the channel path 404 (it is not
    proxied to a replica), so the outer pool falls back to plain HTTP and the request works."""
    router, _ = fleet
    up = Upstream()
    try:
        body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0.0}).encode()
        for _ in range(2):
            resp = await up.post(router.url, "/v1/completions", body)
            assert resp.status == 200
            assert json.loads(await resp.read())["usage"]["completion_tokens"] == 3
            await resp.aclose()
        assert up.no_channel == {router.url} and not up.channels
    finally:
        up.close()


async def test_pause_abort_returns_partial_outputs_from_both(fleet):
    router, (a, b) = fleet
    body = {"max_tokens": 300, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    firsts = [asyncio.Event() for _ in range(8)]
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(_stream(client, router.url, {**body, "prompt": f"long {i}"}, first=firsts[i]))
                 for i in range(8)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 60)
        r = await client.post(router.url + "/v1/pause", json={"mode": "abort"})
        outs = await asyncio.gather(*tasks)
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply["ok"] and set(reply["replicas"]) == {a.url, b.url}
        assert all(len(res["aborted"]) >= 1 for res in reply["replicas"].values()), reply
        for o in outs:
            assert o["finish"] == "abort" and 0 < len(o["ids"]) < 300
        assert (await client.post(router.url + "/v1/resume")).json()["ok"]


def test_failed_weight_update_on_one_replica_leaves_both_on_old_version(fleet, tiny_ckpt):
    router, (a, b) = fleet
    new = tiny_ckpt("llama", seed=1)            # B refuses it: outside B's --weights-root
    probe = {"prompt": "weights?", **GREEDY}
    old_out = httpx.post(a.url + "/v1/completions", json=probe, timeout=60).json()["choices"][0]["token_ids"]
    r = httpx.post(router.url + "/v1/update_weights", json={"path": new, "version": 5}, timeout=120)
    assert r.status_code == 502
    reply = r.json()
    assert not reply["ok"] and "error" in reply["replicas"][b.url] and "error" not in reply["replicas"][a.url]
    assert "error" not in reply["rolled_back"][a.url]
    for s in (a, b):
        st = s.control("/v1/state", method="GET")
        assert st["weight_version"] == 0 and st["state"] == "serving"
    assert httpx.post(a.url + "/v1/completions", json=probe, timeout=60).json()["choices"][0]["token_ids"] == old_out
    health = httpx.get(router.url + "/health").json()
    assert {v["state"] for v in health["replicas"].values()} == {"up"}


def test_transactional_push_through_the_router(fleet, tiny_ckpt):
    """A trainer's WeightSender pointed at the router: its stage (commit=false) is held on every
    replica and its commit fans out; when one replica cannot stage, every replica keeps its version."""
    from tidal.models.loader import iter_checkpoint
    from tidal.sync import WeightSender

    router, (a, b) = fleet
    new = tiny_ckpt("llama", seed=2)
    probe = {"prompt": "push?", **GREEDY}
    old = httpx.post(a.url + "/v1/completions", json=probe, timeout=60).json()["choices"][0]["token_ids"]
    v0 = a.control("/v1/state", method="GET")["weight_version"]
    sender = WeightSender([router.url], backend="shm", timeout_s=60)
    try:
        b.control("/v1/pause", {"mode": "keep"})
        b.control("/v1/sleep", {"tags": ["weights"]})      # B cannot stage while its weights sleep
        r = sender.push(dict(iter_checkpoint(new)), v0 + 1)
        assert not r.ok
        b.control("/v1/wake_up", {})
        b.control("/v1/resume", {})
        for s in (a, b):
            st = s.control("/v1/state", method="GET")
            assert st["weight_version"] == v0 and st["weight_transfer"]["staged_version"] is None
        r = sender.push(dict(iter_checkpoint(new)), v0 + 1)
        assert r.ok, r
        committed = r.replicas[router.url]      # the sender's own commit reached every replica
        assert committed["phase"] == "commit" and set(committed["replicas"]) == {a.url, b.url}
        assert all(res["committed"] and not res["skipped"] for res in committed["replicas"].values())
    finally:
        sender.close()
    outs = []
    for s in (a, b):
        assert s.control("/v1/state", method="GET")["weight_version"] == v0 + 1
        outs.append(httpx.post(s.url + "/v1/completions", json=probe, timeout=60).json()["choices"][0]["token_ids"])
    assert outs[0] == outs[1] != old
    assert {v["state"] for v in httpx.get(router.url + "/health").json()["replicas"].values()} == {"up"}


async def _run_64_and_disturb(router, disturb, extra: list[dict], pinned: dict, params: dict = GREEDY):
    """64 greedy streams and the `extra` bodies sent with the `pinned` headers; `disturb()` once the
    streams have 3 tokens each on average and each extra one has its first tokens.

    The tiny model outruns this client: by the time it has read 3 tokens a stream, the 64 may all
    be done upstream. The extra streams, long and pinned to the replica the test disturbs, are
    what is certain to be in flight there."""
    seen, progress, firsts = [0, 64 * 3], asyncio.Event(), [asyncio.Event() for _ in extra]
    async with httpx.AsyncClient(timeout=180) as client:
        tasks = [asyncio.create_task(_stream(client, router.url, {**params, "prompt": p}, seen, progress))
                 for p in PROMPTS]
        tasks += [asyncio.create_task(_stream(client, router.url, body, seen, progress, first, pinned))
                  for body, first in zip(extra, firsts)]
        await asyncio.wait_for(asyncio.gather(progress.wait(), *(f.wait() for f in firsts)), 120)
        result = await disturb(client)
        outs = await asyncio.gather(*tasks)
    return outs, result


async def test_drain_mid_run_moves_streams_without_duplicate_or_gap(fleet):
    router, (a, b) = fleet
    ref = await _reference(b.url, PROMPTS, GREEDY)
    # seeded, penalized (greedy and seeded), long and pinned to A: each moves, and continues as if
    # it had not moved
    n = EXTRA_TOKENS
    extras = [{"prompt": f"seeded {i}", "max_tokens": n, "temperature": 1.0, "seed": 11 + i, "ignore_eos": True,
               "return_token_ids": True, **pen}
              for i, pen in enumerate([{}, {}, {"presence_penalty": 0.8, "frequency_penalty": 0.6}] * 2)]
    extras += [{"prompt": f"penalized {i}", "max_tokens": n, "temperature": 0.0, "presence_penalty": 1.0,
                "frequency_penalty": 0.7, "ignore_eos": True, "return_token_ids": True} for i in range(2)]
    async with httpx.AsyncClient(timeout=120) as client:
        rs = await asyncio.gather(*(client.post(a.url + "/v1/completions", json=x) for x in extras))
    extras_ref = [r.json()["choices"][0]["token_ids"] for r in rs]

    async def drain(client):
        r = await client.post(router.url + "/v1/replicas/drain", json={"url": a.url, "timeout_s": 60})
        return r.json()

    outs, drained = await _run_64_and_disturb(router, drain, extras, _session_on(router, a.url))
    assert drained["moved"] and not drained["left"], (drained, router.output()[-3000:])
    for o, want in zip(outs[:64], ref):
        assert o["finish"] == "length" and o["ids"] == want        # no duplicate, no gap, same tokens
    # the continuation declares the tokens produced before the move as prior output: the sampler's
    # step and the penalties go on from them, so each equals its unmoved run
    for o, want, body in zip(outs[64:], extras_ref, extras):
        assert o["finish"] == "length" and o["ids"] == want, (body, o["final"]["moved_at"])
        assert 0 < o["final"]["moved_at"][0] < n, ("it moved mid-stream", body, o["final"]["moved_at"])
    state = httpx.get(router.url + "/v1/state").json()
    assert state["replicas"][a.url]["router"]["state"] == "draining"
    r = httpx.post(router.url + "/v1/replicas/undrain", json={"url": a.url}, timeout=30).json()
    assert r["state"] == "up"


def _generate_events(url: str, body: dict, on_event=None) -> tuple[dict, list[dict]]:
    """A streaming /generate: its response headers and every event, in order."""
    events = []
    with httpx.stream("POST", url + "/generate", json={**body, "stream": True}, timeout=180) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                if on_event is not None:
                    on_event(r.headers, events)
    return dict(r.headers), events


def test_generate_batch_through_the_router_answers_in_sglangs_shape(fleet):
    router, (a, b) = fleet
    body = {"input_ids": [[3, 4, 5], [6, 7]], "rid": ["batch-a", "batch-b"],
            "sampling_params": [{"max_new_tokens": 5, "temperature": 0.0, "n": 2}, {"max_new_tokens": 3,
                                                                                    "temperature": 0.0}]}
    direct = httpx.post(a.url + "/generate", json=body, timeout=60).json()
    routed = httpx.post(router.url + "/generate", json=body, timeout=60).json()
    assert [x["index"] for x in routed] == [0, 1, 2] and len(direct) == 3
    for got, want in zip(routed, direct):
        for k in ("output_ids", "text", "request_id", "finish_reason", "completion_tokens", "prompt_tokens"):
            assert got[k] == want[k], k
        assert got["meta_info"]["id"] == want["meta_info"]["id"]
        assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
        got_lp, want_lp = got["meta_info"]["output_token_logprobs"], want["meta_info"]["output_token_logprobs"]
        assert [e[1] for e in got_lp] == [e[1] for e in want_lp] == got["output_ids"]
        assert [e[0] for e in got_lp] == pytest.approx([e[0] for e in want_lp], abs=1e-4)
    bad = httpx.post(router.url + "/generate", json={"input_ids": [1, 2], "rid": 5}, timeout=60)
    assert bad.status_code == 400 and "rid" in bad.text                    # passed on, refused by the replica
    # a one-prompt batch is still a list; a text batch works; SGLang's cumulative stream is kept
    one = httpx.post(router.url + "/generate", json={"text": ["hello"], "sampling_params": {"max_new_tokens": 2}},
                     timeout=60).json()
    assert isinstance(one, list) and len(one) == 1 and one[0]["completion_tokens"] == 2
    _, events = _generate_events(router.url, {"text": ["a b", "c d"], "sampling_params": {
        "max_new_tokens": 6, "temperature": 0.0}})
    _, want = _generate_events(b.url, {"text": ["a b", "c d"], "sampling_params": {
        "max_new_tokens": 6, "temperature": 0.0}})
    for idx in (0, 1):
        got_ids = [e["output_ids"] for e in events if e["index"] == idx]
        want_ids = [e["output_ids"] for e in want if e["index"] == idx]
        assert got_ids[-1] == want_ids[-1] and len(got_ids[-1]) == 6
        assert all(x == y[:len(x)] for x, y in zip(got_ids, got_ids[1:]))     # each event: the output so far


async def test_generate_batch_drained_mid_stream_continues_as_one_group(fleet):
    router, (a, b) = fleet
    greedy = {"temperature": 0.0, "max_new_tokens": 120, "ignore_eos": True}
    prompts = [[11, 12, 13], [21, 22], [31, 32, 33]]
    body = {"input_ids": prompts, "sampling_params": [
        {**greedy, "n": 2}, {**greedy, "repetition_penalty": 1.5}, {**greedy, "frequency_penalty": 1.0}]}
    ref = httpx.post(b.url + "/generate", json=body, timeout=120).json()
    drained = {}

    def drain_once(headers, events):
        if not drained and len(events) >= 4:
            drained["url"] = headers["x-tidal-replica"]
            drained["reply"] = httpx.post(router.url + "/v1/replicas/drain", json={
                "url": drained["url"], "timeout_s": 60}, timeout=90).json()

    headers, events = await asyncio.to_thread(_generate_events, router.url, body, drain_once)
    assert drained["reply"]["moved"] and not drained["reply"]["left"], drained
    finals = {}
    for idx in range(4):      # SGLang's cumulative stream: each event extends the one before, no gap
        seq = [e for e in events if e["index"] == idx]
        assert all(x["output_ids"] == y["output_ids"][:len(x["output_ids"])] for x, y in zip(seq, seq[1:]))
        finals[idx] = seq[-1]
        assert finals[idx]["finish_reason"] == "length" and len(finals[idx]["output_ids"]) == 120
    assert sum(bool(f["moved_at"]) for f in finals.values()) >= 1
    # greedy samples and penalties: repetition_penalty counts prompt + output, frequency_penalty the
    # output, which the continuation declares (prior_output_tokens): the same tokens after a move
    for idx in (0, 1, 2, 3):
        assert finals[idx]["output_ids"] == ref[idx]["output_ids"], (idx, finals[idx]["moved_at"])
        assert finals[idx]["meta_info"]["completion_tokens"] == 120
    r = httpx.post(router.url + "/v1/replicas/undrain", json={"url": drained["url"]}, timeout=30).json()
    assert r["state"] == "up"


async def test_killed_replica_streams_continue_then_abort_when_none_left(fleet):
    router, (a, b) = fleet
    long = {**GREEDY, "max_tokens": 48}
    ref = await _reference(b.url, PROMPTS, long)
    guard = {**GREEDY, "max_tokens": EXTRA_TOKENS, "prompt": "guard"}   # pinned to A: in flight at the kill
    guard_ref = (await _reference(b.url, ["guard"], guard))[0]

    async def kill(client):
        kill_replica(a)

    outs, _ = await _run_64_and_disturb(router, kill, [guard], _session_on(router, a.url), params=long)
    for o, want in zip(outs, ref + [guard_ref]):
        assert o["finish"] == "length" and o["ids"] == want
    assert 0 < outs[64]["final"]["moved_at"][0] < EXTRA_TOKENS, (outs[64]["final"], outs[64]["replica"], a.url)
    health = httpx.get(router.url + "/health").json()
    assert health["replicas"][a.url]["state"] == "down" and health["replicas"][b.url]["state"] == "up"
    state = httpx.get(router.url + "/v1/state").json()
    assert "error" in state["replicas"][a.url] and state["replicas"][a.url]["router"]["state"] == "down"
    # the last replica dies too: streams end with finish_reason="abort" and the tokens they had
    firsts = [asyncio.Event() for _ in range(4)]
    long = {"max_tokens": 300, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    async with httpx.AsyncClient(timeout=120) as client:
        tasks = [asyncio.create_task(_stream(client, router.url, {**long, "prompt": f"last {i}"}, first=firsts[i]))
                 for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 60)
        kill_replica(b)
        outs = await asyncio.gather(*tasks)
    for o in outs:
        assert o["finish"] == "abort" and 0 < len(o["ids"]) < 300
    assert httpx.get(router.url + "/health").status_code == 503
