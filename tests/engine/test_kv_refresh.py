"""KV refresh (tidal/engine/kv_refresh.py): requests running through a weight update with no pause
take KV recomputed under the staged weights before the commit (EngineConfig.kv_refresh) instead of
recomputing it at the commit (the default) — and what they generate is the same either way: old weights' tokens up to the commit, the
new weights' greedy continuation after it."""

from __future__ import annotations

import threading
import time

import pytest

from tests.engine.conftest import assert_no_leaks
from tidal import SamplingParams
from tidal.models.loader import iter_checkpoint

PROMPTS = [[5, 6, 7], [100 + i for i in range(40)], [42] * 13, [7, 8] * 30]
N = 160


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt):
    return tiny_ckpt("qwen2", seed=0), tiny_ckpt("qwen2", seed=1)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


class Streams:
    """PROMPTS generating on a thread; `wait(k)`: until the engine has run k steps with them."""

    def __init__(self, llm) -> None:
        self.llm, self.out = llm, {}
        self.start_step = llm.state()["step_count"]
        self.thread = threading.Thread(
            target=lambda: self.out.update(outs=llm.generate(PROMPTS, greedy(N), use_tqdm=False))
        )
        self.thread.start()

    def wait(self, steps: int) -> None:
        deadline = time.monotonic() + 30
        while self.llm.state()["step_count"] < self.start_step + steps:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the requests did not run"
            time.sleep(0.002)

    def join(self) -> list:
        self.thread.join(60)
        assert not self.thread.is_alive()
        return [o.outputs[0] for o in self.out["outs"]]


def check_split(llm, outs, v_old: int, v_new: int) -> None:
    """Every request ran across the commit: its tokens before it are the old weights' greedy ones
    (`on_old`), after it the engine's (now serving the new weights) greedy continuation."""
    for prompt, c in zip(PROMPTS, outs):
        spans = [(s.version, s.start, s.end) for s in c.weight_spans]
        assert [s[0] for s in spans] == [v_old, v_new], spans
        k = spans[0][2]
        assert 0 < k < N and spans == [(v_old, 0, k), (v_new, k, N)]
        after = llm.generate([prompt + c.token_ids[:k]], greedy(N - k), use_tqdm=False)[0].outputs[0].token_ids
        assert c.token_ids[k:] == after


def staged_during_streams(ckpts, make_llm, version: int, on_a: bool = False):
    """A refreshing engine on A with PROMPTS streaming, B staged (commit=False) under them; also
    A's greedy tokens of PROMPTS when `on_a`."""
    a, b = ckpts
    llm = make_llm(a, kv_refresh=True)
    ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(N), use_tqdm=False)] if on_a else None
    streams = Streams(llm)
    streams.wait(5)
    staged = llm.update_weights(named_tensors=dict(iter_checkpoint(b)), version=version, commit=False)
    assert staged["staged"] and staged["staged_version"] == version
    return llm, streams, ref


@pytest.mark.parametrize("refresh", [True, False])
def test_requests_through_a_push_continue_on_the_new_weights(ckpts, make_llm, refresh):
    a, b = ckpts
    llm = make_llm(a, kv_refresh=refresh)
    on_a = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(N), use_tqdm=False)]
    streams = Streams(llm)
    streams.wait(10)
    res = llm.update_weights(named_tensors=dict(iter_checkpoint(b)), version=1)
    outs = streams.join()
    if refresh:
        assert res["refreshed"] == len(PROMPTS) and res["recomputed"] == 0, res
    else:
        assert res["recomputed"] == len(PROMPTS) and res["refreshed"] == 0, res
    for c, ref in zip(outs, on_a):
        k = c.weight_spans[0].end
        assert c.token_ids[:k] == ref[:k]
    check_split(llm, outs, 0, 1)
    assert_no_leaks(llm)


def test_a_staged_update_keeps_its_refresh_until_the_commit(ckpts, make_llm):
    llm, streams, _ = staged_during_streams(ckpts, make_llm, 4)
    refresh = llm.state()["weight_transfer"]["kv_refresh"]
    assert refresh["caught_up"] and refresh["passes"] >= 1, refresh
    step = llm.state()["step_count"]
    streams.wait(step - streams.start_step + 3 * 4)  # the requests run on: shadows fall behind, then catch up
    res = llm.commit_weights(4)
    assert res["refreshed"] == len(PROMPTS) and res["recomputed"] == 0, res
    check_split(llm, streams.join(), 0, 4)
    assert_no_leaks(llm)


def test_an_aborted_update_frees_its_shadows_and_changes_nothing(ckpts, make_llm):
    llm, streams, on_a = staged_during_streams(ckpts, make_llm, 2, on_a=True)
    assert llm.abort_staged()["aborted"]
    assert llm.state()["weight_transfer"]["kv_refresh"] is None
    outs = streams.join()
    assert [c.token_ids for c in outs] == on_a
    assert all(len(c.weight_spans) == 1 for c in outs)
    assert_no_leaks(llm)


def test_no_room_for_shadows_falls_back_to_recompute(ckpts, make_llm):
    """A pool nearly full when the update arrives: the refresh takes only blocks the live requests
    can spare (it never preempts one), gives up on the rest, and the commit recomputes those."""
    a, b = ckpts
    final = sum(-(-(len(p) + N) // 4) for p in PROMPTS)  # blocks the requests hold at their end
    llm = make_llm(a, num_kv_blocks=final + 6, kv_refresh=True)
    streams = Streams(llm)
    streams.wait(N - 40)
    llm.pause("keep")
    res = llm.update_weights(named_tensors=dict(iter_checkpoint(b)), version=1)
    assert res["recomputed"] >= 1 and res["kv_refresh"]["gave_up"], res
    assert llm.state()["num_preemptions"] == res["recomputed"]  # the commit's retractions, no other
    llm.resume()
    check_split(llm, streams.join(), 0, 1)
    assert_no_leaks(llm)


def test_sleeping_the_kv_cache_drops_a_staged_refresh(ckpts, make_llm):
    llm, streams, _ = staged_during_streams(ckpts, make_llm, 3)
    llm.pause("keep")
    llm.sleep(["kv_cache"])
    llm.wake_up()
    res = llm.commit_weights(3)
    assert res["refreshed"] == 0, res
    llm.resume()
    outs = streams.join()
    assert all(c.weight_spans[-1].version == 3 for c in outs)
    assert_no_leaks(llm)


def test_forks_and_aborts_during_a_staged_refresh(ckpts, make_llm):
    """n=2 samples fork while shadows are kept, one request is aborted while it has a shadow: the
    commit moves the others, every block comes back."""
    a, b = ckpts
    llm = make_llm(a, kv_refresh=True)
    outs: dict = {}
    pair = SamplingParams(n=2, max_tokens=N, temperature=0, ignore_eos=True)

    def run(key, prompt, params, request_id):
        outs[key] = llm.generate([prompt], params, use_tqdm=False, request_ids=[request_id])[0]

    threads = [threading.Thread(target=run, args=("long", PROMPTS[1], greedy(N), "long")),
               threading.Thread(target=run, args=("gone", PROMPTS[2], greedy(N), "gone"))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while llm.state()["num_running"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    llm.update_weights(named_tensors=dict(iter_checkpoint(b)), version=7, commit=False)
    fork = threading.Thread(target=run, args=("pair", PROMPTS[3], pair, "pair"))
    fork.start()
    while llm.state()["num_running"] < 4:  # the pair forked: 2 + 2 running, shadows for the first two
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert llm.abort(["gone"])["aborted"]
    res = llm.commit_weights(7)
    assert res["refreshed"] >= 1, res
    for t in [*threads, fork]:
        t.join(60)
    assert outs["gone"].outputs[0].finish_reason == "abort"
    assert outs["long"].outputs[0].weight_spans[-1].version == 7
    samples = [c.token_ids for c in outs["pair"].outputs]
    assert len(samples) == 2 and samples[0] == samples[1] and len(samples[0]) == N
    assert_no_leaks(llm)


def test_a_failing_refresh_falls_back_to_recompute(ckpts, make_llm, monkeypatch):
    """The refresh is an optimisation: an error in it leaves the update and the engine sound."""
    from tidal.engine.kv_refresh import KvRefresh

    def broken(self, running):
        raise RuntimeError("injected")

    monkeypatch.setattr(KvRefresh, "_plan", broken)
    a, b = ckpts
    llm = make_llm(a, kv_refresh=True)
    streams = Streams(llm)
    streams.wait(10)
    res = llm.update_weights(named_tensors=dict(iter_checkpoint(b)), version=1)
    assert res["recomputed"] == len(PROMPTS) and res["refreshed"] == 0, res
    assert "injected" in res["kv_refresh"]["gave_up"]
    check_split(llm, streams.join(), 0, 1)
    assert_no_leaks(llm)
