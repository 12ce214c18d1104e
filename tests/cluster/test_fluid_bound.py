"""The upper bounds on simulated utilization (the fluid bound, and the switch-cost bound that also
charges load/offload): exact where they can be computed by hand, never below what any planner
configuration reaches, in either mode, and the switch-cost bound never above the fluid one."""

from __future__ import annotations

import random

import pytest

from tidal.cluster import PlannerConfig
from tidal.cluster.bound import switch_bound
from tidal.cluster.sim import SimConfig, Workload, compare, fluid_bound, simulate

CONFIGS = [PlannerConfig(), PlannerConfig(guarantee=0.0), PlannerConfig(surplus="most_done_first"),
           PlannerConfig(surplus="shortest_first", guarantee=0.5),
           PlannerConfig(surplus="shortest_first", guarantee=0.0, hysteresis=0.0, protect_fraction=0.0)]


def test_bound_is_exact_on_a_pipeline_that_never_waits():
    # by hand: 8 samples of 5 s on 2 GPUs x 4 slots fill the pool for exactly 5 s (10 GPU-s), then
    # 3 s of reward and 2 s of training on both GPUs (4 GPU-s): 14 useful GPU-s every 10 s on 2
    # GPUs = 0.7, and free load/offload/retract let the simulator reach it
    w = [Workload("a", rollout_size=8, sample_median_s=5.0, sample_sigma=0.0, reward_s=3.0, train_s=2.0, steps=3)]
    cfg = SimConfig(num_gpus=2, tp=1, slots=4, load_s=0.0, offload_s=0.0, retract_s=0.0)
    out = compare(w, cfg)
    assert out["shared"].makespan_s == pytest.approx(30.0)
    assert out["bound"] == pytest.approx(0.7)
    assert out["fluid_bound"] == pytest.approx(0.7)
    assert out["shared"].utilization == pytest.approx(0.7)
    assert out["of_bound"] == pytest.approx(1.0)


def test_bound_of_two_pipelines_is_the_pool_when_their_demand_exceeds_it():
    # by hand: each alone needs 16 GPU-s of rollout (>= 4 s on 4 GPUs, its sample is 4 s) and 2 s
    # x 2 GPUs of training per 7 s step: 20 GPU-s per 7 s each, 40/7 = 5.7 > 4 GPUs: the pool caps it
    w = [Workload(n, rollout_size=16, sample_median_s=4.0, sample_sigma=0.0, reward_s=1.0, train_s=2.0)
         for n in ("a", "b")]
    cfg = SimConfig(num_gpus=4, tp=1, slots=4, horizon_s=70.0)
    assert fluid_bound(w, cfg) == pytest.approx(1.0)
    # one pipeline on its own 2 GPUs (static): 16 GPU-s take 8 s, then 1 + 2 s: 20 GPU-s per 11 s
    # of 2 GPUs; over 70 s: six steps (66 s, 120 GPU-s) and 4 s of the seventh rollout (8 GPU-s)
    static = fluid_bound(w, cfg, mode="static")
    assert static == pytest.approx(2 * 128.0 / (4 * 70.0))


def test_switch_bound_is_exact_when_every_rollout_pays_one_load_and_offload():
    # by hand: one GPU, so each step's rollout is one replica: load 2 s, 4 samples of 5 s in its 4
    # slots (5 GPU-s), offload 1 s, reward 3 s, train 2 s (2 GPU-s): 7 useful GPU-s per 13 s step;
    # three steps end at 39 s. The fluid bound reaches the same only because it stops at 3 steps
    w = [Workload("a", rollout_size=4, sample_median_s=5.0, sample_sigma=0.0, reward_s=3.0, train_s=2.0, steps=3)]
    cfg = SimConfig(num_gpus=1, tp=1, slots=4, load_s=2.0, offload_s=1.0)
    r = simulate(w, cfg)
    assert r.makespan_s == pytest.approx(39.0)
    assert r.utilization == pytest.approx(21 / 39)
    assert switch_bound(w, cfg, window=(0.0, 39.0)) == pytest.approx(21 / 39, rel=1e-3)
    # over a horizon the fluid bound fits a fourth step (10 s, free handoffs) into [0, 52]; the
    # switch bound knows a step takes 13 s: four steps, 28 useful GPU-s
    cfg.horizon_s = 52.0
    assert fluid_bound(w, cfg) > 28 / 52 + 0.05
    assert switch_bound(w, cfg) == pytest.approx(28 / 52, rel=1e-3)


def test_switch_bound_charges_loads_when_the_pool_is_contended():
    # two pipelines whose rollouts want more than the pool: the fluid bound is the pool (1.0); the
    # switch bound charges every replica's 3 s of load + offload (and lengthens every step by them)
    w = [Workload(n, rollout_size=64, sample_median_s=4.0, sample_sigma=0.3, reward_s=5.0, train_s=5.0)
         for n in ("a", "b")]
    cfg = SimConfig(num_gpus=4, tp=1, slots=4, load_s=2.0, offload_s=1.0, horizon_s=300.0)
    fluid, switch = fluid_bound(w, cfg), switch_bound(w, cfg)
    assert fluid == pytest.approx(1.0)
    assert switch < 0.97
    r = simulate(w, cfg)
    assert r.utilization <= switch


@pytest.mark.parametrize("seed", range(6))
def test_bound_is_never_below_any_planner_on_random_small_workloads(seed):
    rng = random.Random(seed)
    n = rng.choice([2, 3, 4])
    wls = [Workload(f"p{i}", rollout_size=rng.randint(4, 40), sample_median_s=rng.uniform(1.0, 6.0),
                    sample_sigma=rng.uniform(0.0, 1.2), sample_max_s=rng.uniform(10.0, 40.0),
                    reward_s=rng.uniform(0.0, 30.0), train_s=rng.uniform(1.0, 20.0),
                    start_s=rng.choice([0.0, rng.uniform(0.0, 30.0)])) for i in range(n)]
    tp = rng.choice([1, 2])
    cfg = SimConfig(num_gpus=n * tp * rng.choice([1, 2]), tp=tp, slots=rng.choice([2, 4, 8]),
                    load_s=rng.uniform(0.0, 2.0), offload_s=rng.uniform(0.0, 1.0), retract_s=rng.uniform(0.0, 1.0),
                    seed=seed, horizon_s=rng.uniform(120.0, 250.0))
    for planner in CONFIGS:
        cfg.planner = planner
        for mode in ("static", "shared"):
            r = simulate(wls, cfg, mode)
            window = (r.window_start_s, r.window_s)
            bound = fluid_bound(wls, cfg, mode, window)
            switch = switch_bound(wls, cfg, mode, window)
            assert 0.0 < r.utilization <= switch + 1e-9, (planner, mode, r.utilization, switch)
            assert switch <= bound + 1e-9 <= 1.0 + 2e-9, (planner, mode, switch, bound)


def test_bound_rejects_a_window_it_cannot_measure():
    w = [Workload("a")]
    with pytest.raises(ValueError, match="horizon_s"):
        fluid_bound(w, SimConfig())
    with pytest.raises(ValueError, match="window"):
        fluid_bound(w, SimConfig(), window=(10.0, 10.0))
    with pytest.raises(ValueError, match="horizon_s"):
        switch_bound(w, SimConfig())
    with pytest.raises(ValueError, match="mode"):
        switch_bound(w, SimConfig(), mode="fluid", window=(0.0, 10.0))
    with pytest.raises(ValueError, match="grid"):
        switch_bound(w, SimConfig(), window=(0.0, 10.0), grid=2)
