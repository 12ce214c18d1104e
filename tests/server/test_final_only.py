"""A request that is not streamed gets one output from the engine process, its final one: no
per-token outputs cross the process boundary for a caller that waits for the end anyway. Real
engine process under an EngineClient; the outputs counted where they arrive (_Stream.put)."""
from __future__ import annotations

import asyncio
import collections

import pytest

from tidal.config import EngineConfig
from tidal.sampling_params import SamplingParams
from tidal.server import engine_client as ec


async def test_unstreamed_requests_get_one_output_streamed_ones_each_step(tiny_ckpt, monkeypatch):
    arrived: collections.Counter[str] = collections.Counter()
    put = ec._Stream.put

    def counting_put(self, out):
        arrived[out.request_id] += 1
        put(self, out)

    monkeypatch.setattr(ec._Stream, "put", counting_put)
    config = EngineConfig(model=tiny_ckpt(), device="cpu", block_size=4, num_kv_blocks=256)
    client = await asyncio.wait_for(ec.EngineClient(config, heartbeat_s=0.2).start(), 120.0)
    try:
        greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)

        async def run(rid: str, stream: bool, params: SamplingParams = greedy):
            outs = [o async for o in client.generate(None, params, request_id=rid, stream=stream,
                                                     prompt_token_ids=[5, 6, 7, 8])]
            return outs[-1].outputs[0]

        plain, streamed, pair = await asyncio.wait_for(asyncio.gather(
            run("plain", False), run("streamed", True), run("pair", False, SamplingParams(
                n=2, max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)),
        ), 120.0)
        stop = plain.text[6:9]  # a stop string the greedy text reaches: the engine checks it, streamed or not
        stop_params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
        cut, cut_streamed = await asyncio.wait_for(asyncio.gather(
            run("cut", False, stop_params), run("cut-streamed", True, stop_params)), 120.0)
    finally:
        await client.shutdown()
    assert arrived["plain"] == 1 and arrived["pair"] == 2 and arrived["cut"] == 1  # one final output per sample
    assert arrived["streamed"] > 1
    assert plain.token_ids == streamed.token_ids and len(plain.token_ids) == 24
    assert plain.logprobs is not None and len(plain.logprobs) == 24  # the final output carries them all
    # The same tokens' logprobs, within fp32 noise: the two shared steps with different batch-mates.
    lp = [[(t, e.logprob) for t, e in d.items()] for d in plain.logprobs]
    lp_streamed = [[(t, e.logprob) for t, e in d.items()] for d in streamed.logprobs]
    assert [[t for t, _ in d] for d in lp] == [[t for t, _ in d] for d in lp_streamed]
    assert [v for d in lp for _, v in d] == pytest.approx([v for d in lp_streamed for _, v in d], abs=1e-4)
    assert len(pair.token_ids) == 24
    assert cut.finish_reason == "stop" and cut.stop_reason == stop and stop not in cut.text
    assert (cut.text, cut.token_ids) == (cut_streamed.text, cut_streamed.token_ids)
