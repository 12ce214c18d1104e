"""Control plane through AsyncLLM, with real asyncio tasks racing the core thread."""
from __future__ import annotations

import asyncio

import pytest

from tidal import AsyncLLM, SamplingParams
from tidal.engine.messages import EngineNotServing

LONG = SamplingParams(max_tokens=3000, temperature=0, ignore_eos=True)  # far longer than any test waits


@pytest.fixture(scope="module")
def path(tiny_ckpt):
    return tiny_ckpt("llama", max_position_embeddings=4096)


async def stream(engine: AsyncLLM, prompt, params, rid: str, log: dict) -> tuple[list[int], str]:
    """Consume a delta stream; records what the client saw, returns (tokens, finish_reason)."""
    seen: list[int] = []
    log[rid] = seen
    final = None
    async for out in engine.generate(prompt, params, request_id=rid, delta=True):
        seen.extend(out.outputs[0].token_ids)
        final = out.outputs[0].finish_reason
    return seen, final


async def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def assert_idle_and_clean(engine: AsyncLLM) -> None:
    st = await engine.state()
    assert st["num_running"] == st["num_waiting"] == st["kv_blocks_used"] == 0, st
    engine.engine.core.block_manager.check_invariants([])


async def test_pause_abort_returns_partial_tokens_and_frees_kv(path, make_engine):
    eng = make_engine(path, max_num_seqs=8)
    log: dict[str, list[int]] = {}
    tasks = {f"r{i}": asyncio.create_task(stream(eng, f"prompt {i}", LONG, f"r{i}", log)) for i in range(20)}
    await wait_for(lambda: sum(len(log.get(f"r{i}", [])) >= 3 for i in range(20)) >= 8)
    res = await eng.pause("abort", timeout_s=5)
    assert res["state"] == "paused" and len(res["aborted"]) == 20
    results = {rid: await t for rid, t in tasks.items()}
    tokens_at_pause = {a["request_id"]: a["num_output_tokens"] for a in res["aborted"]}
    partial = [rid for rid, (toks, _) in results.items() if toks]
    assert len(partial) == 8, "the 8 running requests return their partial tokens"
    for rid, (toks, reason) in results.items():
        assert reason == "abort"
        assert len(toks) == tokens_at_pause[rid]      # exactly what was streamed, nothing lost
        assert toks == log[rid]
    await assert_idle_and_clean(eng)

    # While paused, a new request is queued (not run, not lost); it completes after resume.
    queued = asyncio.create_task(stream(eng, "after pause", SamplingParams(max_tokens=5, temperature=0), "q", log))
    await wait_for(lambda: eng.engine.core.held != [])
    assert (await eng.state())["num_held"] == 1 and log["q"] == []
    assert (await eng.resume())["changed"] is True
    toks, reason = await asyncio.wait_for(queued, 20)
    assert reason in ("length", "stop") and toks
    assert (await eng.resume())["changed"] is False     # idempotent


async def test_reject_while_paused(path, make_engine):
    eng = make_engine(path, reject_while_paused=True)
    await eng.pause("abort")
    await eng.pause("abort")   # duplicate: harmless
    with pytest.raises(EngineNotServing, match="paused"):
        async for _ in eng.generate("x", SamplingParams(max_tokens=3)):
            pass
    await eng.resume()
    outs = [o async for o in eng.generate("x", SamplingParams(max_tokens=3, temperature=0))]
    assert outs[-1].finished


@pytest.mark.parametrize("mode", ["retract", "keep"])
async def test_retract_and_keep_resume_to_identical_output(path, make_engine, mode):
    eng = make_engine(path, max_num_seqs=4)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    prompts = [f"request number {i}" for i in range(10)]
    ref_log: dict[str, list[int]] = {}
    reference = await asyncio.gather(*(stream(eng, p, params, f"ref{i}", ref_log) for i, p in enumerate(prompts)))

    log: dict[str, list[int]] = {}
    tasks = [asyncio.create_task(stream(eng, p, params, f"r{i}", log)) for i, p in enumerate(prompts)]
    await wait_for(lambda: sum(len(log.get(f"r{i}", [])) > 5 for i in range(10)) >= 4)
    res = await eng.pause(mode)
    assert res["state"] == "paused"
    if mode == "retract":
        assert len(res["retracted"]) == 4 and (await eng.state())["kv_blocks_used"] == 0
    else:
        assert len(res["kept"]) == 10 and (await eng.state())["kv_blocks_used"] > 0
    frozen = {k: len(v) for k, v in log.items()}
    await asyncio.sleep(0.1)
    assert {k: len(v) for k, v in log.items()} == frozen, "nothing runs while paused"
    await eng.resume()
    results = await asyncio.gather(*tasks)
    for (toks, reason), (ref, _), rid in zip(results, reference, [f"r{i}" for i in range(10)]):
        assert reason == "length"
        assert toks == ref, "same greedy output as an uninterrupted run, no duplicate or missing token"
    await assert_idle_and_clean(eng)


async def test_drain_with_short_deadline_aborts_exactly_the_stragglers(path, make_engine):
    eng = make_engine(path, max_num_seqs=16)
    short = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    log: dict[str, list[int]] = {}
    tasks = {f"s{i}": asyncio.create_task(stream(eng, f"s{i}", short, f"s{i}", log)) for i in range(4)}
    tasks |= {f"l{i}": asyncio.create_task(stream(eng, f"l{i}", LONG, f"l{i}", log)) for i in range(4)}
    await wait_for(lambda: all(len(log.get(f"l{i}", [])) >= 1 for i in range(4)))
    res = await eng.pause("drain", timeout_s=0.3)
    results = {rid: await t for rid, t in tasks.items()}
    stragglers = {rid for rid, (_, reason) in results.items() if reason == "abort"}
    assert stragglers == {f"l{i}" for i in range(4)}
    assert {a["request_id"] for a in res["aborted"]} == stragglers
    # A short request may already have finished before the drain began; every one that finished
    # during it is reported, and no short request is cut off.
    assert {f["request_id"] for f in res["finished"]} <= {f"s{i}" for i in range(4)}
    assert all(results[f"s{i}"] == (log[f"s{i}"], "length") and len(log[f"s{i}"]) == 3 for i in range(4))
    assert res["state"] == "paused"
    await assert_idle_and_clean(eng)


async def test_drain_completes_early_when_work_is_done(path, make_engine):
    eng = make_engine(path)
    task = asyncio.create_task(stream(eng, "a", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "a", {}))
    await asyncio.sleep(0)
    res = await eng.pause("drain", timeout_s=30)
    assert res["aborted"] == [] and res["elapsed_s"] < 30
    assert (await task)[1] == "length"


async def test_abort_ids_and_unknown_ids(path, make_engine):
    eng = make_engine(path)
    log: dict[str, list[int]] = {}
    t1 = asyncio.create_task(stream(eng, "one", LONG, "one", log))
    t2 = asyncio.create_task(stream(eng, "two", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), "two", log))
    await wait_for(lambda: len(log.get("one", [])) > 2)
    res = await eng.abort(["one", "nope"])
    assert res["aborted"] == ["one"] and res["unknown"] == ["nope"]
    toks, reason = await t1
    assert reason == "abort" and toks == log["one"] and len(toks) > 2
    assert (await t2)[1] == "length"


async def test_cancelled_stream_aborts_its_request(path, make_engine):
    eng = make_engine(path)
    log: dict[str, list[int]] = {}
    task = asyncio.create_task(stream(eng, "bye", LONG, "bye", log))
    await wait_for(lambda: len(log.get("bye", [])) > 2)
    task.cancel()
    await wait_for(lambda: eng.engine.core.scheduler.running == [])
    await assert_idle_and_clean(eng)


async def test_sleep_and_wake_restore_exactly(path, make_engine):
    eng = make_engine(path)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    before = [o async for o in eng.generate("sleepy", params)][-1].outputs[0].token_ids
    with pytest.raises(Exception, match="pause it first"):
        await eng.sleep(["kv_cache"])
    await eng.pause("abort")
    res = await eng.sleep(["kv_cache", "weights"])
    st = await eng.state()
    assert st["state"] == "sleeping" and res["bytes_freed"]["kv_cache"] > 0 and res["bytes_freed"]["weights"] > 0
    assert st["memory_bytes"] == {"kv_cache": 0, "weights": 0}
    with pytest.raises(Exception, match="wake_up first"):
        await eng.resume()
    await eng.wake_up(["kv_cache"])
    assert (await eng.state())["state"] == "sleeping"
    await eng.wake_up()
    assert (await eng.state())["state"] == "paused"
    await eng.resume()
    after = [o async for o in eng.generate("sleepy", params)][-1].outputs[0].token_ids
    assert after == before


async def test_sleep_discard_reloads_from_disk(path, make_engine):
    eng = make_engine(path)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    before = [o async for o in eng.generate("discard", params)][-1].outputs[0].token_ids
    await eng.pause("keep")
    await eng.sleep(["weights"], discard=True)
    await eng.wake_up(["weights"])
    await eng.resume()
    assert [o async for o in eng.generate("discard", params)][-1].outputs[0].token_ids == before


async def test_sleep_kv_retracts_kept_requests(path, make_engine):
    eng = make_engine(path)
    log: dict[str, list[int]] = {}
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    ref = (await stream(eng, "kept", params, "ref", {}))[0]
    task = asyncio.create_task(stream(eng, "kept", params, "k", log))
    await wait_for(lambda: len(log.get("k", [])) > 3)
    await eng.pause("keep")
    res = await eng.sleep(["kv_cache"])
    assert [r["request_id"] for r in res["retracted"]] == ["k"]
    await eng.wake_up()
    await eng.resume()
    assert (await task)[0] == ref
