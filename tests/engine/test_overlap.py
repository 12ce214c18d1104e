"""Overlap scheduling: step N+1 is scheduled and launched before step N's tokens are back.

Every output must be exactly what the engine produces without overlap — same tokens, logprobs,
finish reasons — across the paths that interact with a token that is not known yet on the host:
EOS and stop ids, stop strings, max_tokens and max_model_len, min_tokens, n-sample forks,
prefix caching, chunked prefill, preemption in a small KV pool, and aborts in flight.
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest

from tidal import SamplingParams
from tests.engine.conftest import assert_no_leaks


@pytest.fixture(scope="module")
def path(tiny_ckpt):
    return tiny_ckpt("qwen2")


def workload(eos: int):
    rng = random.Random(7)
    shared = [rng.randrange(1, 250) for _ in range(24)]
    prompts, params = [], []
    for i in range(40):
        kind = i % 8
        prompt = shared + [rng.randrange(1, 250) for _ in range(rng.randrange(1, 30))] if i % 3 == 0 else \
            [rng.randrange(1, 250) for _ in range(rng.randrange(1, 60))]
        p = dict(max_tokens=rng.randrange(1, 40), temperature=0.0)
        if kind == 1:
            p.update(temperature=0.9, top_p=0.9, seed=i, n=3)
        elif kind == 2:
            p.update(stop_token_ids=[rng.randrange(1, 250) for _ in range(20)])
        elif kind == 3:
            p.update(stop=["a", "e", "o"], temperature=0.7, seed=i)
        elif kind == 4:
            p.update(min_tokens=5, max_tokens=20, stop_token_ids=[eos])
        elif kind == 5:
            p.update(logprobs=3, temperature=1.0, top_k=20, seed=i)
        elif kind == 6:
            p.update(ignore_eos=True, max_tokens=60, logprobs=0)
        prompts.append(prompt)
        params.append(SamplingParams(**p))
    return prompts, params


def summary(outs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.token_logprobs) for c in o.outputs] for o in outs]


def assert_same(got, expected):
    """Same tokens and finish; logprobs equal up to float noise (batches are composed differently)."""
    assert [[c[:3] for c in o] for o in got] == [[c[:3] for c in o] for o in expected]
    for o, e in zip(got, expected):
        for c, d in zip(o, e):
            assert (c[3] is None) == (d[3] is None)
            if c[3] is not None:
                assert c[3] == pytest.approx(d[3], abs=1e-4)


@pytest.mark.parametrize("engine_kw", [
    dict(),                                                  # roomy: pure overlap
    dict(num_kv_blocks=48, max_num_batched_tokens=32),       # preemption and chunked prefill
    dict(max_model_len=72, enable_prefix_caching=False),     # requests run into max_model_len
])
def test_overlap_gives_the_same_outputs_as_serial_steps(path, make_llm, engine_kw):
    serial = make_llm(path, overlap_scheduling=False, max_num_seqs=16, **engine_kw)
    eos = serial.engine.core.eos_token_ids[0]
    prompts, params = workload(eos)
    if "max_model_len" in engine_kw:
        # every request may run up to the model's length limit
        params = [dataclasses.replace(p, max_tokens=72 - len(q)) for p, q in zip(params, prompts)]
    expected = summary(serial.generate(prompts, params, use_tqdm=False))

    llm = make_llm(path, max_num_seqs=16, **engine_kw)
    assert llm.engine.core.config.overlap_scheduling
    got = summary(llm.generate(prompts, params, use_tqdm=False))
    assert_same(got, expected)
    st = llm.state()
    assert st["overlapped_steps"] > st["step_count"] // 3, st
    assert_no_leaks(llm)
    if "num_kv_blocks" in engine_kw:
        assert st["num_preemptions"] > 0, "the small pool should force preemption"


def test_abort_while_a_step_is_in_flight_loses_nothing(path, make_llm):
    """Aborts race the overlapped loop: every aborted request ends with exactly the tokens it was
    sent (no placeholder leaks out), the rest finish normally, and no block leaks."""
    llm = make_llm(path, max_num_seqs=32)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    ref = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids
    results = {}
    ids = [f"r{i}" for i in range(24)]
    core = llm.engine.core
    start = core.num_overlapped_steps   # the reference run counted its own: wait for 20 of these
    t = threading.Thread(target=lambda: results.update(
        outs=llm.generate([[5, 6, 7]] * 24, params, use_tqdm=False, request_ids=ids)))
    t.start()
    deadline = time.monotonic() + 30
    while core.num_overlapped_steps < start + 20 and time.monotonic() < deadline:
        time.sleep(0.001)
    res = llm.abort(ids[::2])
    t.join(60)
    assert not t.is_alive()
    assert sorted(res["aborted"]) == sorted(ids[::2])
    for o in results["outs"]:
        c = o.outputs[0]
        assert -1 not in c.token_ids
        assert c.token_ids == ref[:len(c.token_ids)]
        assert c.finish_reason == ("abort" if int(o.request_id[1:]) % 2 == 0 else "length")
    assert_no_leaks(llm)
