"""GpuScheduler service: seed-003 rollout boundary, preemption, handoff, failures, death, timeouts."""

from __future__ import annotations

import asyncio

import pytest

from tidal.cluster import (ClusterSpec, ControllerError, PipelineDeadError, PipelineSpec, PlanInvariantError,
                           PlannerConfig, Priority, SchedulerError, SchedulerTimeoutError, SpecError, UnknownPipelineError)
from tidal.cluster.state import Plan


GEN, TRAIN = Priority.GENERATION, Priority.ACTOR_TRAINING


class FakeController:
    """A GenerationController that records calls and can be told to fail or hang."""

    def __init__(self, name: str, delay_s: float = 0.0):
        self.name = name
        self.delay_s = delay_s
        self.active: set[int] = set()
        self.calls: list[tuple[str, list[int]]] = []
        self.fail_on: set[str] = set()
        self.hang_on: set[str] = set()

    async def _op(self, op: str, ranks: list[int]) -> None:
        self.calls.append((op, list(ranks)))
        if op in self.hang_on:
            await asyncio.Event().wait()
        await asyncio.sleep(self.delay_s)
        if op in self.fail_on:
            raise RuntimeError(f"{self.name}: {op} exploded")

    async def shrink(self, ranks: list[int]) -> None:
        assert set(ranks) <= self.active, (self.name, ranks, self.active)
        await self._op("shrink", ranks)
        self.active -= set(ranks)

    async def expand(self, ranks: list[int]) -> None:
        assert not set(ranks) & self.active, (self.name, ranks, self.active)
        await self._op("expand", ranks)
        self.active |= set(ranks)


def two_pipeline_spec(pid: str, train: list[int], infer: list[int], tp: int = 1) -> PipelineSpec:
    return PipelineSpec(pid, clusters={"actor_train": ClusterSpec(gpus=train),
                                       "actor_infer": ClusterSpec(gpus=infer, tp=tp, generation=True)})


async def setup_two(make_sched, tp: int = 1, delay_s: float = 0.0, **kw):
    """Seed 003's topology: 4 GPUs, P1 trains on [0,1], P2 on [2,3], both generate on [0..3]."""
    s = await make_sched(4, **kw)
    ctrls = {}
    for pid, train in (("p1", [0, 1]), ("p2", [2, 3])):
        ctrls[pid] = FakeController(pid, delay_s)
        await s.register_pipeline(two_pipeline_spec(pid, train, [0, 1, 2, 3], tp), generation=ctrls[pid])
    return s, ctrls


async def test_seed003_rollout_boundary_both_pipelines_get_replicas(make_sched):
    """Between rollouts training preempts every generation replica; both pipelines then open demand
    at once. Neither may hang: both unblock with >= 1 replica, for several rollouts in a row."""
    s, ctrls = await setup_two(make_sched)

    async def pipeline(pid: str, rollouts: int) -> None:
        for step in range(rollouts):
            ranks = await s.request_gpus(pid, "actor_infer", GEN, step_target=8, timeout_s=5)
            assert ranks and set(ranks) <= ctrls[pid].active
            for done in range(0, 9, 4):
                s.report_progress(pid, completed=done, target=8)
                await asyncio.sleep(0)
            gpus = await s.release_then_request(pid, release="actor_infer", request="actor_train",
                                                priority=TRAIN, timeout_s=5)
            assert not ctrls[pid].active  # all generation replicas shrunk before training
            await asyncio.sleep(0.01 * (step % 2))
            await s.release_gpus(pid, "actor_train")

    await asyncio.wait_for(asyncio.gather(pipeline("p1", 4), pipeline("p2", 4)), 20)
    assert s.snapshot()["idle"] == [0, 1, 2, 3]


async def test_seed003_late_requester_is_not_starved(make_sched):
    """P1 opens demand first and takes every replica; P2 asking later still gets one (min-one), and
    its demand stays visible while it waits: no `begin_progress_batch` race decides who runs.
    The gap-ratio split over the full floor (the default before the fluid-bound search) evens out
    equal demand; the default shortest-first split keeps >= 1 each (the min-one part holds)."""
    s, ctrls = await setup_two(make_sched, config=PlannerConfig(surplus="proportional", guarantee=1.0))
    assert await s.request_gpus("p1", "actor_infer", GEN, step_target=100) == [0, 1, 2, 3]
    ranks = await s.request_gpus("p2", "actor_infer", GEN, step_target=100, timeout_s=5)
    assert len(ranks) >= 1
    snap = s.snapshot()
    assert set(snap["demand"]) == {"p1", "p2"}
    await _settle(s)
    # equal demand: the split converges to 2 + 2
    assert len(ctrls["p1"].active) == 2 and len(ctrls["p2"].active) == 2


async def test_demand_is_durable_across_a_timeout(make_sched):
    """A generation request that times out (pool held by training) keeps its demand open; the
    replicas come as soon as training releases, with no second request."""
    s, ctrls = await setup_two(make_sched)
    assert await s.request_gpus("p1", "actor_train", TRAIN) == [0, 1]
    assert await s.request_gpus("p2", "actor_train", TRAIN) == [2, 3]
    with pytest.raises(SchedulerTimeoutError, match="GENERATION"):
        await s.request_gpus("p1", "actor_infer", GEN, step_target=10, timeout_s=0.05)
    assert s.snapshot()["demand"] == {"p1": 10}
    await s.release_gpus("p2", "actor_train")
    await _settle(s)
    assert ctrls["p1"].active == {2, 3}


async def test_training_preempts_generation_replicas_it_needs(make_sched):
    s, ctrls = await setup_two(make_sched, tp=2)
    assert await s.request_gpus("p1", "actor_infer", GEN, step_target=10) == [0, 1]
    await _settle(s)
    assert ctrls["p1"].active == {0, 1}
    assert await s.request_gpus("p2", "actor_train", TRAIN, timeout_s=5) == [2, 3]
    assert ("shrink", [1]) in ctrls["p1"].calls and ctrls["p1"].active == {0}
    assert s.snapshot()["allocations"]["p2"] == {"actor_train": [2, 3]}
    await s.release_gpus("p2", "actor_train")
    await _settle(s)
    assert ctrls["p1"].active == {0, 1}  # generation grows back into the freed GPUs


async def test_priority_order_among_waiting_requests(make_sched):
    s = await make_sched(2)
    for pid in ("a", "b", "c"):
        await s.register_pipeline(PipelineSpec(pid, clusters={
            "actor_train": ClusterSpec(gpus=[0, 1]), "reference": ClusterSpec(gpus=[0, 1])}))
    assert await s.request_gpus("a", "actor_train", TRAIN) == [0, 1]
    order: list[str] = []

    async def want(pid: str, cluster: str, prio: Priority) -> None:
        await s.request_gpus(pid, cluster, prio, timeout_s=5)
        order.append(pid)
        await asyncio.sleep(0.01)
        await s.release_gpus(pid, cluster)

    low = asyncio.create_task(want("b", "reference", Priority.REF_LOG_PROBS))
    await asyncio.sleep(0.01)
    high = asyncio.create_task(want("c", "actor_train", Priority.ACTOR_TRAINING))
    await asyncio.sleep(0.01)
    assert [p["pipeline"] for p in s.snapshot()["pending"]] == ["b", "c"]
    await s.release_gpus("a", "actor_train")
    await asyncio.gather(low, high)
    assert order == ["c", "b"]  # the later but higher-priority request goes first


async def test_release_then_request_hands_over_without_a_gap(make_sched):
    """P1 finishes its rollout and moves to training in one step: the generation GPUs it gives
    back cannot be taken by P2's generation before P1's training grant lands."""
    s, ctrls = await setup_two(make_sched, delay_s=0.01)
    await s.request_gpus("p1", "actor_infer", GEN, step_target=10)
    await s.request_gpus("p2", "actor_infer", GEN, step_target=10)
    await _settle(s)
    gpus = await s.release_then_request("p1", release="actor_infer", request="actor_train",
                                        priority=TRAIN, timeout_s=5)
    assert gpus == [0, 1]
    await _settle(s)
    assert ctrls["p2"].active == {2, 3}
    # P2 never expanded onto P1's training GPUs in between
    p2_expanded = {r for op, ranks in ctrls["p2"].calls if op == "expand" for r in ranks}
    assert p2_expanded <= {0, 1, 2, 3}
    assert not ({0, 1} & ctrls["p2"].active)
    assert s.snapshot()["allocations"]["p1"] == {"actor_train": [0, 1]}


async def test_release_then_request_training_to_generation(make_sched):
    s, ctrls = await setup_two(make_sched)
    await s.request_gpus("p1", "actor_train", TRAIN)
    ranks = await s.release_then_request("p1", release="actor_train", request="actor_infer",
                                         priority=GEN, step_target=4, timeout_s=5)
    assert ranks and s.snapshot()["allocations"]["p1"] == {}


async def test_failing_shrink_kills_only_that_pipeline(make_sched):
    s, ctrls = await setup_two(make_sched)
    await s.request_gpus("p1", "actor_infer", GEN, step_target=10)
    await _settle(s)
    ctrls["p1"].fail_on.add("shrink")
    # P2's training preempts P1's replicas; P1's controller explodes; P2 is granted anyway
    assert await s.request_gpus("p2", "actor_train", TRAIN, timeout_s=5) == [2, 3]
    snap = s.snapshot()
    assert "p1" in snap["dead"] and "exploded" in snap["dead"]["p1"]
    assert snap["allocations"]["p1"] == {} and snap["generation"]["p1"]["active"] == []
    assert snap["idle"] == [0, 1]
    with pytest.raises(PipelineDeadError, match="p1"):
        await s.request_gpus("p1", "actor_train", TRAIN)
    # P2 keeps running; P1 can come back after unregistering
    await s.release_gpus("p2", "actor_train")
    await s.unregister_pipeline("p1")
    ctrls["p1"] = FakeController("p1")
    await s.register_pipeline(two_pipeline_spec("p1", [0, 1], [0, 1, 2, 3]), generation=ctrls["p1"])
    assert await s.request_gpus("p1", "actor_train", TRAIN, timeout_s=5) == [0, 1]


async def test_failing_expand_fails_its_own_request_with_the_error(make_sched):
    s, ctrls = await setup_two(make_sched)
    ctrls["p2"].fail_on.add("expand")
    await s.request_gpus("p1", "actor_infer", GEN, step_target=10)
    with pytest.raises(ControllerError, match="expand.*exploded"):
        await s.request_gpus("p2", "actor_infer", GEN, step_target=10, timeout_s=5)
    await _settle(s)
    assert ctrls["p1"].active == {0, 1, 2, 3}  # P1 takes the pool back


async def test_hanging_controller_times_out_and_dies(make_sched):
    s, ctrls = await setup_two(make_sched)
    s.controller_timeout_s = 0.05
    await s.request_gpus("p1", "actor_infer", GEN, step_target=10)
    ctrls["p1"].hang_on.add("shrink")
    assert await s.request_gpus("p2", "actor_train", TRAIN, timeout_s=5) == [2, 3]
    assert "timed out" in s.snapshot()["dead"]["p1"]


async def test_unregister_gives_gpus_back_and_fails_waiters(make_sched):
    s, ctrls = await setup_two(make_sched)
    assert await s.request_gpus("p1", "actor_train", TRAIN) == [0, 1]
    await s.request_gpus("p1", "actor_infer", GEN, step_target=10)
    other = PipelineSpec("p3", clusters={"actor_train": ClusterSpec(gpus=[0, 1, 2])})
    await s.register_pipeline(other)
    waiting = asyncio.create_task(s.request_gpus("p3", "actor_train", TRAIN, timeout_s=5))
    p1_waiting = asyncio.create_task(s.request_gpus("p1", "actor_infer", GEN, step_target=10, timeout_s=5))
    await asyncio.sleep(0.01)
    await s.unregister_pipeline("p1")
    assert await waiting == [0, 1, 2]
    assert (await asyncio.gather(p1_waiting, return_exceptions=True))[0] is not None
    with pytest.raises(UnknownPipelineError, match="p1"):
        await s.request_gpus("p1", "actor_train", TRAIN)


async def test_unregister_while_waiting_fails_the_waiter(make_sched):
    s, ctrls = await setup_two(make_sched)
    await s.request_gpus("p1", "actor_train", TRAIN)
    await s.register_pipeline(PipelineSpec("p3", clusters={"t": ClusterSpec(gpus=[1])}))
    waiting = asyncio.create_task(s.request_gpus("p3", "t", TRAIN, timeout_s=5))
    await asyncio.sleep(0.01)
    await s.unregister_pipeline("p3")
    with pytest.raises(PipelineDeadError, match="unregistered"):
        await waiting
    assert s.snapshot()["pending"] == []


async def test_training_request_timeout_leaves_no_pending_request(make_sched):
    s, _ = await setup_two(make_sched)
    await s.register_pipeline(PipelineSpec("p3", clusters={"t": ClusterSpec(gpus=[0])}))
    await s.request_gpus("p1", "actor_train", TRAIN)
    with pytest.raises(SchedulerTimeoutError, match=r"timeout_s=0\.05.*p1/actor_train"):
        await s.request_gpus("p3", "t", Priority.INITIALIZATION, timeout_s=0.05)
    assert s.snapshot()["pending"] == []
    await s.release_gpus("p1", "actor_train")
    assert await s.request_gpus("p3", "t", Priority.INITIALIZATION, timeout_s=1) == [0]


async def test_cancelled_request_is_withdrawn(make_sched):
    s, _ = await setup_two(make_sched)
    await s.register_pipeline(PipelineSpec("p3", clusters={"t": ClusterSpec(gpus=[0])}))
    await s.request_gpus("p1", "actor_train", TRAIN)
    t = asyncio.create_task(s.request_gpus("p3", "t", TRAIN))
    await asyncio.sleep(0.01)
    assert len(s.snapshot()["pending"]) == 1
    t.cancel()
    await asyncio.gather(t, return_exceptions=True)
    await s.release_gpus("p1", "actor_train")
    await _settle(s)
    assert s.snapshot()["pending"] == [] and s.snapshot()["allocations"]["p3"] == {}


async def test_clear_progress_makes_replicas_donors(make_sched):
    s, ctrls = await setup_two(make_sched)
    await s.request_gpus("p1", "actor_infer", GEN, step_target=10)
    await _settle(s)
    s.clear_progress("p1")
    assert s.snapshot()["demand"] == {}
    await s.request_gpus("p2", "actor_infer", GEN, step_target=10)
    await _settle(s)
    assert ctrls["p2"].active == {0, 1, 2, 3} and not ctrls["p1"].active


async def test_bad_arguments_name_the_field(make_sched):
    s = await make_sched(4)
    with pytest.raises(SpecError, match="gpu 9 is outside the pool"):
        await s.register_pipeline(PipelineSpec("x", clusters={"t": ClusterSpec(gpus=[9])}))
    with pytest.raises(SpecError, match="tp=3 does not divide"):
        await s.register_pipeline(two_pipeline_spec("x", [0], [0, 1, 2, 3], tp=3), generation=FakeController("x"))
    with pytest.raises(SpecError, match="generation=None"):
        await s.register_pipeline(two_pipeline_spec("x", [0], [0, 1]))
    await s.register_pipeline(two_pipeline_spec("x", [0], [0, 1]), generation=FakeController("x"))
    with pytest.raises(SpecError, match="already registered"):
        await s.register_pipeline(two_pipeline_spec("x", [0], [0, 1]), generation=FakeController("x"))
    with pytest.raises(UnknownPipelineError, match="pipeline_id='nope'"):
        await s.request_gpus("nope", "actor_train", TRAIN)
    with pytest.raises(SpecError, match="cluster='critic'"):
        await s.request_gpus("x", "critic", TRAIN)
    with pytest.raises(SpecError, match="step_target=None"):
        await s.request_gpus("x", "actor_infer", GEN)
    with pytest.raises(SpecError, match="expected GENERATION"):
        await s.request_gpus("x", "actor_infer", TRAIN, step_target=3)
    with pytest.raises(SpecError, match="timeout_s=0"):
        await s.request_gpus("x", "actor_train", TRAIN, timeout_s=0)
    with pytest.raises(SpecError, match="completed=-1"):
        s.report_progress("x", completed=-1)


async def test_broken_plan_fails_loudly_with_the_plan(make_sched, monkeypatch):
    s, ctrls = await setup_two(make_sched)
    import tidal.cluster.gpu_scheduler as mod
    monkeypatch.setattr(mod, "plan", lambda st, cfg: Plan(expands={"p1": [0], "p2": [0]}))
    with pytest.raises(PlanInvariantError, match=r"gpu 0 twice.*plan=Plan\("):
        await s.request_gpus("p1", "actor_infer", GEN, step_target=3, timeout_s=5)
    with pytest.raises(SchedulerError, match="stopped"):
        await s.request_gpus("p2", "actor_train", TRAIN)
    s._broken = None  # the fixture asserts a healthy scheduler; this one was broken on purpose


async def _settle(s) -> None:
    """Let every in-flight shrink/expand finish and the planner reach a fixpoint."""
    for _ in range(200):
        await asyncio.sleep(0.005)
        if not s._tasks and not s._wake.is_set():
            return
    raise AssertionError(f"scheduler did not settle: {s.snapshot()}")
