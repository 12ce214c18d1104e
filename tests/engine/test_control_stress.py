"""500 rounds of random control operations racing generation: no deadlock, no control call
past its deadline, every request exactly one final output, no block leaked."""
from __future__ import annotations

import asyncio
import random

from tidal import AsyncLLM, SamplingParams
from tidal.engine.messages import EngineError
from tidal.models.loader import iter_checkpoint

ROUNDS = 500
DEADLINE_S = 20.0


async def test_random_control_ops_race_generation(tiny_ckpt):
    a, b = tiny_ckpt("llama", seed=0), tiny_ckpt("llama", seed=1)
    eng = AsyncLLM(a, device="cpu", dtype="float32", block_size=4, num_kv_blocks=96, max_num_seqs=6,
                   max_num_batched_tokens=64)
    rng = random.Random(0)
    finals: dict[str, int] = {}
    outcomes: dict[str, str] = {}
    stop = asyncio.Event()

    async def client(i: int) -> None:
        rid = f"c{i}"
        n = rng.choice([1, 1, 2])
        params = SamplingParams(n=n, max_tokens=rng.randint(1, 40), temperature=rng.choice([0.0, 1.0]),
                                ignore_eos=True, seed=i)
        got_final = 0
        try:
            async for out in eng.generate([rng.randint(0, 250) for _ in range(rng.randint(1, 30))], params,
                                          request_id=rid):
                if out.finished:
                    got_final += 1
                    outcomes[rid] = ",".join(sorted({c.finish_reason for c in out.outputs}))
        except EngineError as e:
            outcomes[rid] = f"error: {e}"
            got_final += 1
        finals[rid] = got_final

    async def producer() -> list[asyncio.Task]:
        tasks, i = [], 0
        while not stop.is_set():
            tasks.append(asyncio.create_task(client(i)))
            i += 1
            await asyncio.sleep(rng.random() * 0.004)
        return tasks

    named_b = dict(iter_checkpoint(b))
    ops = ["pause_abort", "pause_retract", "pause_keep", "pause_drain", "resume", "resume", "abort_some",
           "abort_all", "update_path", "update_named", "sleep_wake", "state", "flush"]
    prod = asyncio.create_task(producer())
    version = 0
    for r in range(ROUNDS):
        op = rng.choice(ops)
        call = {
            "pause_abort": lambda: eng.pause("abort", timeout_s=DEADLINE_S),
            "pause_retract": lambda: eng.pause("retract", timeout_s=DEADLINE_S),
            "pause_keep": lambda: eng.pause("keep", timeout_s=DEADLINE_S),
            "pause_drain": lambda: eng.pause("drain", timeout_s=rng.random() * 0.05),
            "resume": lambda: eng.resume(timeout_s=DEADLINE_S),
            "abort_some": lambda: eng.abort([f"c{rng.randint(0, 2 * r + 5)}" for _ in range(3)], timeout_s=DEADLINE_S),
            "abort_all": lambda: eng.abort(None, timeout_s=DEADLINE_S),
            "update_path": lambda: eng.update_weights(path=rng.choice([a, b]), version=version + 1, timeout_s=DEADLINE_S),
            "update_named": lambda: eng.update_weights(named_tensors=named_b, version=version + 1, timeout_s=DEADLINE_S),
            "state": lambda: eng.state(timeout_s=DEADLINE_S),
            "flush": lambda: eng.flush_cache(timeout_s=DEADLINE_S),
        }.get(op)
        if op == "sleep_wake":
            await eng.pause(rng.choice(["keep", "retract", "abort"]), timeout_s=DEADLINE_S)
            await eng.sleep(rng.choice([["kv_cache"], ["weights"], ["kv_cache", "weights"]]), timeout_s=DEADLINE_S)
            await eng.wake_up(timeout_s=DEADLINE_S)
            continue
        res = await call()   # raises ControlTimeout past its deadline: the test fails
        if op.startswith("update"):
            version = res["weight_version"]
        if rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.01)

    stop.set()
    tasks = await prod
    await eng.resume(timeout_s=DEADLINE_S)
    done, pending = await asyncio.wait(tasks, timeout=60)
    if pending:
        st = await eng.state()
        live = [(r.request_id, r.index, r.status, r.num_computed_tokens, r.num_tokens, len(r.pending_forks))
                for r in eng.engine.core.find_requests(None)]
        raise AssertionError(f"{len(pending)} requests never finished; state={st}; live={live[:10]}")
    assert len(finals) == len(tasks) > 100
    assert all(v == 1 for v in finals.values()), "every request gets exactly one final output"
    assert not [o for o in outcomes.values() if o.startswith("error")]
    assert {"abort", "length"} <= set(",".join(outcomes.values()).split(","))
    st = await eng.state()
    assert st["num_running"] == st["num_waiting"] == st["num_held"] == st["kv_blocks_used"] == 0
    eng.engine.core.block_manager.check_invariants([])
    assert st["weight_version"] == version and eng.engine.core.state.value == "serving"
    eng.shutdown()
