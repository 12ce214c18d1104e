"""The runner keeps its per-request caches in its own table: it writes nothing into the engine's
Request objects, and the engine frees a request's entries when the request finishes."""
from __future__ import annotations

import copy
import dataclasses

import pytest

from tidal import LLM, SamplingParams
from tidal.config import EngineConfig
from tidal.engine.kv_cache import BlockManager
from tidal.engine.request import Request
from tidal.engine.scheduler import Scheduler
from tidal.runner.runner import ModelRunner


@pytest.fixture(scope="module")
def path(tiny_ckpt):
    return tiny_ckpt("qwen3")


def _fields(req: Request) -> dict:
    return {f.name: copy.deepcopy(getattr(req, f.name)) for f in dataclasses.fields(req)
            if f.name not in ("pending_forks", "detokenizer")}


def test_launch_and_collect_write_nothing_into_the_requests(path):
    config = EngineConfig(model=path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=64)
    runner = ModelRunner(config, path)
    scheduler = Scheduler(config, BlockManager(runner.num_blocks, config.block_size))
    reqs = [Request("a", 0, [3, 4, 5], SamplingParams(temperature=0.8, seed=1, logprobs=2), seed=1),
            Request("a", 1, [3, 4, 5], SamplingParams(temperature=0.8, seed=1, logprobs=2), seed=7),
            Request("b", 0, [6, 7], SamplingParams(max_tokens=3, top_k=5, repetition_penalty=1.2), seed=3)]
    for r in reqs:
        scheduler.add(r)
    batch = scheduler.schedule()
    assert batch.reqs == reqs
    before = [_fields(r) for r in reqs]
    sampled = runner.collect(runner.launch(batch, step=0))
    assert len(sampled) == len(reqs)
    assert [_fields(r) for r in reqs] == before
    # The sampling rows are the runner's, one per request object (the two samples of "a" share
    # an id but not a seed, so not a row).
    assert set(runner.sampling_rows) == set(reqs)
    assert runner.sampling_rows[reqs[0]] != runner.sampling_rows[reqs[1]]
    runner.free_requests(reqs[:2])
    assert set(runner.sampling_rows) == {reqs[2]}
    runner.release()
    assert runner.sampling_rows == {}


def test_the_engine_frees_the_runner_caches_of_finished_requests(path):
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=256)
    try:
        outs = llm.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=5, n=3, temperature=1.0, seed=0),
                                                  SamplingParams(max_tokens=4, stop=["a"], ignore_eos=True)],
                            use_tqdm=False)
        assert len(outs) == 2
        assert llm.engine.core.runner.sampling_rows == {}
    finally:
        llm.shutdown()


async def test_the_engine_frees_the_runner_caches_of_aborted_requests(path):
    from tidal import AsyncLLM
    engine = AsyncLLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=256)
    try:
        gen = engine.generate([7, 8], SamplingParams(max_tokens=500, ignore_eos=True), request_id="long")
        first = await gen.__anext__()   # a token is out: the request is mid-decode
        assert not first.finished
        await engine.pause(mode="keep")   # the core thread is settled: its tables can be read
        rows = engine.engine.core.runner.sampling_rows
        assert [r.request_id for r in rows] == ["long"]
        result = await engine.abort(["long"])   # answered once the core thread has ended it
        assert result["aborted"] == ["long"]
        assert rows == {}
        await engine.resume()
        async for out in gen:
            if out.finished:
                assert out.outputs[0].finish_reason == "abort"
    finally:
        engine.shutdown()
