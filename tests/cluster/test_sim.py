"""The simulator: real scheduler, virtual clock, static vs shared, timeline PNG."""

from __future__ import annotations

import asyncio

import pytest

from tidal.cluster.sim import SimConfig, VirtualClockLoop, Workload, compare, plot_timeline, run_virtual


def test_virtual_clock_jumps_instead_of_sleeping():
    async def main() -> float:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(3600.0)
        return loop.time()

    assert run_virtual(main()) == pytest.approx(3600.0)
    assert isinstance(VirtualClockLoop(), asyncio.AbstractEventLoop)


def test_static_and_shared_runs_are_complete_and_consistent(tmp_path):
    wls = [Workload("a", rollout_size=64, train_s=10, reward_s=20, steps=2),
           Workload("b", rollout_size=16, train_s=5, reward_s=5, steps=2)]
    cfg = SimConfig(num_gpus=4, tp=1, slots=8)
    out = compare(wls, cfg)
    for mode in ("static", "shared"):
        r = out[mode]
        assert [len(r.step_times[p]) for p in ("a", "b")] == [2, 2]
        assert 0.0 < r.utilization <= r.busy <= r.allocated <= 1.0 + 1e-9
        for s in r.segments:  # no GPU is in two segments at once
            assert s.end >= s.start
        by_gpu: dict[int, list] = {}
        for s in r.segments:
            for g in s.gpus:
                by_gpu.setdefault(g, []).append((s.start, s.end))
        for spans in by_gpu.values():
            spans.sort()
            assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:]))
    static_gpus = {g for s in out["static"].segments if s.pipeline == "b" for g in s.gpus}
    assert static_gpus == {2, 3}  # static: b never leaves its own GPUs
    plot_timeline([out["static"], out["shared"]], str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 1000
