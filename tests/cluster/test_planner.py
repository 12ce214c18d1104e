"""The planner on its own: unit cases and hypothesis properties over random states and events."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidal.cluster import (ClusterSpec, PipelineSpec, PlanInvariantError, PlannerConfig, Priority, SchedulerState,
                           SpecError, plan, validate_plan)
from tidal.cluster.state import Plan

GEN_CLUSTER = "actor_infer"
# the plain gap ratio, and the gap ratio with the static-split floor (the default)
GAP_RATIO = PlannerConfig(surplus="proportional", guarantee=0.0)
STATIC_FLOOR = PlannerConfig(surplus="proportional", guarantee=1.0)


def spec(pid: str, train: list[int] | None, infer: list[int] | None, tp: int = 1, max_num_seqs: int | None = None,
         **extra) -> PipelineSpec:
    clusters = {}
    if train is not None:
        clusters["actor_train"] = ClusterSpec(gpus=train)
    if infer is not None:
        clusters[GEN_CLUSTER] = ClusterSpec(gpus=infer, tp=tp, generation=True, max_num_seqs=max_num_seqs)
    clusters.update({k: ClusterSpec(gpus=v) for k, v in extra.items()})
    return PipelineSpec(pid, clusters=clusters)


def step(state: SchedulerState, config: PlannerConfig = PlannerConfig()) -> Plan:
    """Plan, validate, apply, and commit every controller call at once (the service does it async)."""
    p = plan(state, config)
    validate_plan(state, p)
    state.begin(p)
    state.check(p)
    for pid, ranks in p.shrinks.items():
        state.finish_shrink(pid, ranks)
    for pid, ranks in p.expands.items():
        assert state.expand_ready(pid, ranks)
        state.finish_expand(pid, ranks)
    state.check(p)
    return p


def settle(state: SchedulerState, rounds: int = 12, config: PlannerConfig = PlannerConfig()) -> int:
    for i in range(rounds):
        if step(state, config).empty:
            return i
    raise AssertionError(f"planner did not reach a fixpoint in {rounds} rounds: {plan(state)}")


def active(state: SchedulerState, pid: str) -> set[int]:
    return state.pipelines[pid].gen.active


def open_in_random_order(state: SchedulerState, pids: list[str], targets: list[int], rng: random.Random,
                         config: PlannerConfig, progress_p: float) -> None:
    """Open each pipeline's rollout in turn, planning in between or not and reporting partial
    progress at random, then plan to the fixpoint."""
    for pid, t in zip(pids, targets):
        state.open_generation(pid, t)
        if rng.random() < 0.5:
            settle(state, config=config)
        if rng.random() < progress_p:
            state.report_progress(pid, rng.randint(0, t))
    settle(state, config=config)


# ---- unit cases ---------------------------------------------------------------------------------

def test_plan_is_pure_and_deterministic():
    st_ = SchedulerState(8)
    for i in range(3):
        st_.register(spec(f"p{i}", [2 * i, 2 * i + 1], list(range(8)), tp=2))
        st_.open_generation(f"p{i}", 10 * (i + 1))
    before = repr(st_)
    a, b = plan(st_), plan(st_)
    assert str(a) == str(b) and repr(st_) == before


def test_idle_pool_goes_to_open_demand_in_proportion():
    st_ = SchedulerState(8)
    for pid in ("a", "b", "c", "d"):
        st_.register(spec(pid, None, list(range(8))))
    st_.open_generation("a", 300)
    st_.open_generation("b", 100)
    settle(st_, config=GAP_RATIO)
    assert len(active(st_, "a")) == 6 and len(active(st_, "b")) == 2


def four_generating(config: PlannerConfig) -> SchedulerState:
    """Four pipelines on one shared 8-GPU pool, rollouts of 400, 400, 400 and 100, settled."""
    st_ = SchedulerState(8)
    for pid, target in (("a", 400), ("b", 400), ("c", 400), ("d", 100)):
        st_.register(spec(pid, None, list(range(8))))
        st_.open_generation(pid, target)
    settle(st_, config=config)
    return st_


def test_guarantee_floor_keeps_an_equal_split_while_all_generate():
    """guarantee=1: with all four pipelines generating, a small rollout still keeps a quarter of
    the pool (what a static split gives it), not its 1/13 demand share."""
    st_ = four_generating(STATIC_FLOOR)
    assert [len(active(st_, p)) for p in "abcd"] == [2, 2, 2, 2]
    st_.clear_progress("a")  # a leaves for training: its surplus goes by the gap ratio
    settle(st_, config=STATIC_FLOOR)
    assert len(active(st_, "d")) == 2 and len(active(st_, "b")) + len(active(st_, "c")) == 6


def test_half_floor_with_shortest_first_staggers_the_rollouts():
    """guarantee=0.5, shortest_first: while all four generate, each keeps half of what a static
    split gives it and the rest goes to the rollout nearest its end, so it finishes (and trains)
    while the others still generate instead of the four finishing together."""
    cfg = PlannerConfig(surplus="shortest_first", guarantee=0.5)
    st_ = four_generating(cfg)
    assert [len(active(st_, p)) for p in "abcd"] == [1, 1, 1, 5]
    st_.clear_progress("d")  # d leaves for training: the next shortest takes its surplus
    st_.report_progress("b", completed=100)
    settle(st_, config=cfg)
    assert [len(active(st_, p)) for p in "abc"] == [1, 6, 1]


def test_shortest_first_surplus_finishes_the_nearest_rollout_first():
    st_ = SchedulerState(8)
    for pid, target in (("a", 400), ("b", 40)):
        st_.register(spec(pid, None, list(range(8))))
        st_.register(spec(pid + "-idle", None, list(range(8))))  # registered, not generating
        st_.open_generation(pid, target)
    settle(st_, config=PlannerConfig(surplus="shortest_first", guarantee=1.0))
    assert len(active(st_, "b")) == 6 and len(active(st_, "a")) == 2
    with pytest.raises(ValueError, match="surplus='fastest'"):
        PlannerConfig(surplus="fastest")


def test_most_done_first_lets_the_rollout_under_way_keep_its_gpus():
    """most_done_first: a rollout that has completed more samples keeps the surplus when a shorter
    one opens (shortest_first would hand it to the newcomer)."""
    def run(surplus: str) -> tuple[int, int]:
        st_ = SchedulerState(8)
        for pid in ("a", "b", "c", "d"):
            st_.register(spec(pid, None, list(range(8))))
        cfg = PlannerConfig(surplus=surplus, guarantee=0.5)
        st_.open_generation("a", 400)
        settle(st_, config=cfg)
        st_.report_progress("a", completed=300)  # 100 left, 300 done
        st_.open_generation("b", 60)  # fewer left, none done
        settle(st_, config=cfg)
        return len(active(st_, "a")), len(active(st_, "b"))

    assert run("most_done_first") == (7, 1)  # b gets its floor: half of an equal split of 8 over 4
    assert run("shortest_first") == (1, 7)


def test_min_one_replica_even_against_the_ratio():
    st_ = SchedulerState(4)
    st_.register(spec("big", None, [0, 1, 2, 3]))
    st_.register(spec("tiny", None, [0, 1, 2, 3]))
    st_.open_generation("big", 10_000)
    settle(st_)
    assert active(st_, "big") == {0, 1, 2, 3}
    st_.open_generation("tiny", 1)
    settle(st_)
    assert len(active(st_, "tiny")) == 1 and len(active(st_, "big")) == 3


def test_seed003_boundary_both_open_pipelines_get_replicas():
    st_ = SchedulerState(4)
    st_.register(spec("p1", [0, 1], [0, 1, 2, 3]))
    st_.register(spec("p2", [2, 3], [0, 1, 2, 3]))
    # rollout boundary: both trained, so neither has a replica; P1 signals demand first
    st_.open_generation("p1", 64)
    p = plan(st_)
    assert p.expands == {"p1": [0, 1, 2, 3]}
    st_.begin(p)  # P1's expansions are in flight when P2 signals
    st_.open_generation("p2", 64)
    st_.finish_expand("p1", p.expands["p1"])
    settle(st_)
    assert active(st_, "p1") and active(st_, "p2")


def test_report_progress_alone_does_not_open_demand():
    """Seed 003's second sub-bug: only request_gpus(GENERATION) opens durable demand."""
    st_ = SchedulerState(2)
    st_.register(spec("p", None, [0, 1]))
    st_.report_progress("p", completed=0, target=5)
    assert plan(st_).empty


def test_shrink_prefers_donor_with_most_negative_gap_and_spares_near_finish():
    st_ = SchedulerState(6)
    for pid in ("a", "b", "c"):
        st_.register(spec(pid, None, list(range(6))))
    st_.open_generation("a", 100)
    st_.open_generation("b", 100)
    settle(st_, config=GAP_RATIO)
    assert len(active(st_, "a")) == 3 and len(active(st_, "b")) == 3
    st_.report_progress("a", completed=98)  # a is close to finishing: protected
    st_.report_progress("b", completed=10)
    st_.open_generation("c", 400)
    settle(st_, config=GAP_RATIO)
    assert len(active(st_, "a")) == 3  # protected: kept its replicas
    assert len(active(st_, "c")) >= 2 and len(active(st_, "b")) >= 1


def test_tail_packs_onto_the_replicas_its_samples_fill():
    """With max_num_seqs=16, a rollout with 10 samples left needs one replica: a newly opened
    pipeline gets the other seven, although the tail pipeline is protected (close to finishing)."""
    for surplus in ("proportional", "shortest_first", "most_done_first"):
        cfg = PlannerConfig(surplus=surplus)
        st_ = SchedulerState(8)
        for pid in ("a", "b"):
            st_.register(spec(pid, None, list(range(8)), max_num_seqs=16))
        st_.open_generation("a", 200)
        settle(st_, config=cfg)
        assert len(active(st_, "a")) == 8
        st_.report_progress("a", completed=190)
        assert plan(st_, cfg).empty  # nobody else wants them: no churn
        st_.open_generation("b", 400)
        settle(st_, config=cfg)
        assert (len(active(st_, "a")), len(active(st_, "b"))) == (1, 7), surplus


def test_no_expansion_past_what_remaining_samples_fill():
    st_ = SchedulerState(8)
    st_.register(spec("a", None, list(range(8)), max_num_seqs=16))
    st_.open_generation("a", 40)  # 40 samples fill 3 replicas of 16
    settle(st_)
    assert len(active(st_, "a")) == 3
    st_.register(spec("b", None, list(range(8))))  # max_num_seqs unknown: every replica counts
    st_.open_generation("b", 2)
    settle(st_)
    assert len(active(st_, "b")) == 5


def test_replicas_past_a_donors_need_move_inside_the_hysteresis_band():
    """b and c each want 3.5 replicas and hold 3 (gap 0.5, inside the band); a holds 2 but its
    samples fill 1. The spare one moves, since a can never want it back."""
    st_ = SchedulerState(8)
    for pid in ("a", "b", "c"):
        st_.register(spec(pid, None, list(range(8)), max_num_seqs=16))
        st_.open_generation(pid, 400)
    st_.pipelines["a"].gen.active = {0, 1}
    st_.pipelines["b"].gen.active = {2, 3, 4}
    st_.pipelines["c"].gen.active = {5, 6, 7}
    st_.report_progress("a", completed=392)
    st_.check()
    cfg = GAP_RATIO
    p = step(st_, cfg)
    assert sum(map(len, p.shrinks.values())) == 1 and list(p.shrinks) == ["a"]
    settle(st_, config=cfg)
    assert len(active(st_, "a")) == 1 and len(active(st_, "b")) + len(active(st_, "c")) == 7


def test_hysteresis_small_demand_drift_moves_nothing():
    cfg = GAP_RATIO
    st_ = SchedulerState(8)
    st_.register(spec("a", None, list(range(8))))
    st_.register(spec("b", None, list(range(8))))
    st_.open_generation("a", 100)
    st_.open_generation("b", 100)
    settle(st_, config=cfg)
    assert len(active(st_, "a")) == 4
    st_.report_progress("a", completed=20)  # wants 80/180*8 = 3.6 replicas: not worth a move
    assert plan(st_, cfg).empty
    st_.report_progress("a", completed=60)  # wants 40/140*8 = 2.3 replicas: move one
    p = step(st_, cfg)
    assert p.shrinks == {"a": [p.shrinks["a"][0]]} and len(p.expands["b"]) == 1


def test_preemption_plan_shrinks_then_grants_next_plan():
    st_ = SchedulerState(4)
    st_.register(spec("p1", [0, 1], [0, 1, 2, 3], tp=2))
    st_.register(spec("p2", [2, 3], [0, 1, 2, 3], tp=2))
    st_.open_generation("p1", 10)
    settle(st_)
    q = st_.add_request("p2", "actor_train", Priority.ACTOR_TRAINING)
    p = plan(st_)
    assert p.shrinks == {"p1": [1]} and not p.grants and not p.expands
    st_.begin(p)
    assert plan(st_).empty  # waits for the shrink; nothing else moves onto those GPUs
    st_.finish_shrink("p1", [1])
    p = plan(st_)
    assert p.grants == [q]


def test_blocked_request_reserves_its_gpus_from_lower_priority():
    st_ = SchedulerState(3)
    st_.register(spec("a", [0, 1], None))
    st_.register(spec("b", [1, 2], None))
    st_.register(spec("c", [2], None))
    st_.pipelines["a"].held["actor_train"] = (0, 1)
    st_.add_request("b", "actor_train", Priority.ACTOR_TRAINING)   # blocked by a on gpu 1
    st_.add_request("c", "actor_train", Priority.VALUE_COMPUTE)     # would fit gpu 2, must wait
    assert plan(st_).grants == []


def test_validate_plan_rejects_each_kind_of_bad_plan():
    st_ = SchedulerState(4)
    st_.register(spec("p1", [0, 1], [0, 1, 2, 3], tp=2))
    st_.register(spec("p2", [2, 3], [0, 1, 2, 3], tp=2))
    st_.open_generation("p1", 10)
    settle(st_)
    q = st_.add_request("p2", "actor_train", Priority.ACTOR_TRAINING)
    bad = {
        "grant of a busy GPU": Plan(grants=[q]),
        "shrink of an inactive rank": Plan(shrinks={"p2": [0]}),
        "expand of an active rank": Plan(expands={"p1": [0]}),
        "expand onto another's replica": Plan(expands={"p2": [1]}),
        "rank outside the cluster": Plan(expands={"p2": [5]}),
        "unknown pipeline": Plan(shrinks={"ghost": [0]}),
    }
    for why, p in bad.items():
        with pytest.raises(PlanInvariantError, match=r"plan=Plan\("):
            validate_plan(st_, p)
    validate_plan(st_, Plan(shrinks={"p1": [1]}, expands={"p2": [1]}))  # a handoff is fine


def test_check_catches_a_corrupted_state():
    st_ = SchedulerState(4)
    st_.register(spec("p1", [0, 1], [0, 1, 2, 3]))
    st_.pipelines["p1"].held["actor_train"] = (0, 1)
    st_.pipelines["p1"].gen.active.add(0)
    with pytest.raises(PlanInvariantError, match="I1.*gpu 0 owned twice"):
        st_.check()


def test_spec_errors_name_field_value_and_expectation():
    with pytest.raises(SpecError, match="num_gpus=0"):
        SchedulerState(0)
    st_ = SchedulerState(4)
    with pytest.raises(SpecError, match="tp=3 does not divide the 4 GPUs"):
        st_.register(spec("x", None, [0, 1, 2, 3], tp=3))
    with pytest.raises(SpecError, match=r"gpus \[1, 1\] has duplicates"):
        st_.register(spec("x", [1, 1], None))
    with pytest.raises(SpecError, match="gpu -1 is outside the pool"):
        st_.register(spec("x", [-1], None))
    with pytest.raises(SpecError, match="at most one"):
        st_.register(PipelineSpec("x", clusters={"a": ClusterSpec([0], generation=True),
                                                 "b": ClusterSpec([1], generation=True)}))
    for bad in (0, 2.5):
        with pytest.raises(SpecError, match=f"max_num_seqs={bad}"):
            st_.register(PipelineSpec("x", clusters={"g": ClusterSpec([0], generation=True, max_num_seqs=bad)}))
    with pytest.raises(SpecError, match="max_num_seqs=8.*generation cluster"):
        st_.register(PipelineSpec("x", clusters={"t": ClusterSpec([0], max_num_seqs=8)}))
    st_.register(spec("x", [0], [0, 1]))
    with pytest.raises(SpecError, match="step_target=0"):
        st_.open_generation("x", 0)


# ---- properties -----------------------------------------------------------------------------------

@st.composite
def pools(draw):
    n = draw(st.integers(1, 12))
    specs = []
    for i in range(draw(st.integers(1, 4))):
        clusters = {}
        for name in draw(st.lists(st.sampled_from(["actor_train", "critic", "reference"]), unique=True, max_size=2)):
            clusters[name] = ClusterSpec(gpus=draw(st.lists(st.integers(0, n - 1), unique=True, min_size=1)))
        if draw(st.booleans()) or not clusters:
            tp = draw(st.sampled_from([t for t in (1, 2, 4) if t <= n]))
            k = draw(st.integers(1, n // tp))
            gpus = draw(st.permutations(range(n)))[:k * tp]
            if draw(st.booleans()):
                gpus = sorted(gpus)
            clusters[GEN_CLUSTER] = ClusterSpec(gpus=gpus, tp=tp, generation=True,
                                                max_num_seqs=draw(st.sampled_from([None, 1, 16, 64])))
        specs.append(PipelineSpec(f"p{i}", clusters=clusters))
    return n, specs


configs = st.builds(PlannerConfig, hysteresis=st.sampled_from([0.0, 0.25, 1.0]),
                    protect_fraction=st.sampled_from([0.0, 0.05, 0.5]), guarantee=st.sampled_from([0.0, 0.5, 1.0]),
                    surplus=st.sampled_from(["proportional", "shortest_first", "most_done_first"]))


def apply_event(state: SchedulerState, inflight: list, rng: random.Random, kind: str,
                config: PlannerConfig = PlannerConfig()) -> None:
    pids = [p for p, ps in state.pipelines.items() if ps.dead is None]
    if not pids:
        if kind == "commit":
            inflight.clear()  # every owner is dead and kill() took its GPUs back: nothing left to finish
        return
    pid = rng.choice(pids)
    ps = state.pipelines[pid]
    training = [c for c, s in ps.spec.clusters.items() if not s.generation]
    try:
        if kind == "request" and training:
            state.add_request(pid, rng.choice(training), rng.choice(list(Priority)[:-1]))
        elif kind == "release":
            state.release(pid, rng.choice(list(ps.spec.clusters)))
        elif kind == "open" and ps.gen is not None:
            state.open_generation(pid, rng.randint(1, 500))
        elif kind == "progress" and ps.gen is not None:
            state.report_progress(pid, rng.randint(0, max(ps.gen.step_target, 1)))
        elif kind == "clear" and ps.gen is not None:
            state.clear_progress(pid)
        elif kind == "kill":
            state.kill(pid, "test")
        elif kind == "plan":
            p = plan(state, config)
            validate_plan(state, p)
            state.begin(p)
            inflight += [("shrink", q, r) for q, r in p.shrinks.items()]
            inflight += [("expand", q, r) for q, r in p.expands.items()]
        elif kind == "commit" and inflight:
            order = list(range(len(inflight)))
            rng.shuffle(order)
            for i in order:  # the first op that can finish now
                op, q, ranks = inflight[i]
                if op == "shrink":
                    state.finish_shrink(q, ranks)
                elif state.expand_ready(q, ranks):
                    state.finish_expand(q, ranks)
                else:
                    continue
                inflight.pop(i)
                break
    except SpecError:
        pass  # an event that is invalid right now (request for a held cluster, ...)


EVENTS = ["request", "release", "open", "progress", "clear", "kill", "plan", "plan", "commit", "commit", "commit"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools(), st.lists(st.sampled_from(EVENTS), max_size=80), st.integers(0, 2**32 - 1), configs)
def test_random_events_never_break_an_invariant(pool, events, seed, config):
    n, specs = pool
    rng = random.Random(seed)
    state = SchedulerState(n)
    for s in specs:
        state.register(s)
    inflight: list = []
    for kind in events:
        apply_event(state, inflight, rng, kind, config)
        state.check()
    # drain: every in-flight op finishes, then the planner reaches a fixpoint (no flapping)
    while inflight:
        apply_event(state, inflight, rng, "commit")
        state.check()
    settle(state, config=config)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 8), st.lists(st.integers(1, 1000), min_size=1, max_size=8),
       st.integers(0, 2**32 - 1), configs)
def test_every_open_pipeline_gets_a_replica_when_the_pool_allows(tp, replicas, targets, seed, config):
    """Shared generation cluster, no training: with no more open pipelines than replicas, every
    open pipeline holds at least one replica at the fixpoint, whatever the order of events."""
    rng = random.Random(seed)
    gpus = list(range(tp * replicas))
    state = SchedulerState(len(gpus))
    pids = [f"p{i}" for i in range(len(targets))]
    for pid in pids:
        state.register(spec(pid, None, gpus, tp=tp))
    open_in_random_order(state, pids, targets, rng, config, progress_p=0.3)
    counts = [len(active(state, p)) for p in pids]
    if len(pids) <= replicas:
        assert all(c >= 1 for c in counts), counts
    assert sum(counts) == replicas  # work conserving: no replica left idle


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(1, 300), min_size=1, max_size=6),
       st.sampled_from([1, 8, 32]), st.integers(0, 2**32 - 1), configs)
def test_tails_pack_and_spare_replicas_stay_in_use(replicas, targets, seqs, seed, config):
    """With max_num_seqs declared, at the fixpoint no pipeline gained a replica its remaining
    samples cannot fill, and no replica is idle while an open pipeline holds fewer than it fills."""
    rng = random.Random(seed)
    gpus = list(range(replicas))
    state = SchedulerState(replicas)
    pids = [f"p{i}" for i in range(len(targets))]
    for pid in pids:
        state.register(spec(pid, None, gpus, max_num_seqs=seqs))
    open_in_random_order(state, pids, targets, rng, config, progress_p=0.5)
    gens = [state.pipelines[p].gen for p in pids]
    if len(pids) <= replicas:
        assert all(g.current >= 1 for g in gens)
    short = any(g.current < g.needed for g in gens)
    assert not short or sum(g.current for g in gens) == replicas
    for p in pids:  # a plan never takes a pipeline past its need (it may keep what it had)
        before = {q: state.pipelines[q].gen.current for q in pids}
        state.report_progress(p, state.pipelines[p].gen.step_target)  # all done: need drops to 1
        step(state, config)
        for q in pids:
            g = state.pipelines[q].gen
            assert g.current <= max(before[q], g.needed)
