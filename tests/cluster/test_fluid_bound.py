"""The fluid upper bound on simulated utilization: exact where it can be computed by hand, and
never below what any planner configuration reaches, in either mode."""

from __future__ import annotations

import random

import pytest

from tidal.cluster import PlannerConfig
from tidal.cluster.sim import SimConfig, Workload, compare, fluid_bound, simulate

CONFIGS = [PlannerConfig(), PlannerConfig(guarantee=0.0), PlannerConfig(surplus="shortest_first", guarantee=0.5),
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
            bound = fluid_bound(wls, cfg, mode, (r.window_start_s, r.window_s))
            assert 0.0 < r.utilization <= bound + 1e-9 <= 1.0 + 2e-9, (planner, mode, r.utilization, bound)


def test_bound_rejects_a_window_it_cannot_measure():
    w = [Workload("a")]
    with pytest.raises(ValueError, match="horizon_s"):
        fluid_bound(w, SimConfig())
    with pytest.raises(ValueError, match="window"):
        fluid_bound(w, SimConfig(), window=(10.0, 10.0))
