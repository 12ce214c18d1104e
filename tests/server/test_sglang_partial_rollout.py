"""A slime-style partial rollout through the SGLang surface: 16 prompts with return_logprob,
/abort_request {abort_all} midway, each partial output resumed with its tokens appended and
max_new_tokens reduced; the joined greedy outputs equal an uninterrupted run."""
from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest

N = 160


@pytest.fixture(scope="module")
def rollout_server(make_server, server_model):
    s = make_server(server_model, "--max-num-seqs", "16")
    yield s
    s.stop()


def _body(ids: list[int], budget: int) -> dict:
    return {"input_ids": ids, "return_logprob": True,
            "sampling_params": {"max_new_tokens": budget, "temperature": 0, "ignore_eos": True}}


async def _generate_all(client: httpx.AsyncClient, url: str, prompts: list[list[int]], budgets: list[int]) -> list:
    rs = await asyncio.gather(*(client.post(url + "/generate", json=_body(p, b)) for p, b in zip(prompts, budgets)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json() for r in rs]


async def _until_midway(client: httpx.AsyncClient, server, steps: int, deadline_s: float = 60.0) -> None:
    """Until the engine has run `steps` steps with requests running (bounded by a deadline)."""
    start = None
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        st = (await client.get(server.url + "/v1/state", headers=server.admin_headers())).json()
        if st["num_running"] > 0:
            start = st["step_count"] if start is None else start
            if st["step_count"] - start >= steps:
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the engine did not reach {steps} steps within {deadline_s}s")


def test_abort_all_then_resume_equals_uninterrupted(rollout_server):
    s = rollout_server
    prompts = [[3 + i, 17, 40 + 2 * i, 9, 100 + i] for i in range(16)]

    async def run() -> tuple[list, list, list]:
        async with httpx.AsyncClient(timeout=120) as client:
            ref = await _generate_all(client, s.url, prompts, [N] * 16)
            work = asyncio.ensure_future(_generate_all(client, s.url, prompts, [N] * 16))
            await _until_midway(client, s, steps=20)
            r = await client.post(s.url + "/abort_request", json={"abort_all": True}, headers=s.admin_headers())
            assert r.status_code == 200 and r.json()["success"] is True, r.text
            partial = await work
            budgets = [N - len(p["output_ids"]) for p in partial]
            todo = [i for i, b in enumerate(budgets) if b > 0]
            resumed = await _generate_all(client, s.url, [prompts[i] + partial[i]["output_ids"] for i in todo],
                                          [budgets[i] for i in todo])
            return ref, partial, dict(zip(todo, resumed))

    ref, partial, resumed = asyncio.run(run())
    aborted = [p for p in partial if p["meta_info"]["finish_reason"]["type"] == "abort"]
    assert aborted and any(0 < len(p["output_ids"]) < N for p in aborted)
    for i, p in enumerate(partial):
        meta = p["meta_info"]
        lps = meta["output_token_logprobs"]
        assert [e[1] for e in lps] == p["output_ids"] and meta["completion_tokens"] == len(p["output_ids"])
        want = [e[0] for e in ref[i]["meta_info"]["output_token_logprobs"][:len(lps)]]
        assert all(math.isclose(a[0], b, abs_tol=1e-4) for a, b in zip(lps, want))
        if meta["finish_reason"]["type"] == "abort":
            assert meta["finish_reason"] == {"type": "abort", "message": "the request was aborted"}
        joined = p["output_ids"] + (resumed[i]["output_ids"] if i in resumed else [])
        assert joined == ref[i]["output_ids"], i
        if i in resumed:
            assert resumed[i]["meta_info"]["finish_reason"] == {"type": "length", "length": N - len(p["output_ids"])}
