"""The scheduler as a Ray actor on a local CPU-only Ray instance."""

from __future__ import annotations

import asyncio

import pytest

ray = pytest.importorskip("ray")

from tidal.cluster import ClusterSpec, PipelineSpec, Priority, SpecError  # noqa: E402
from tidal.cluster.ray import create_scheduler_actor  # noqa: E402


@ray.remote(num_cpus=0)
class EngineStub:
    """Stands in for a pipeline's engine control plane: records shrink/expand."""

    def __init__(self) -> None:
        self.active: set[int] = set()

    async def shrink(self, ranks: list[int]) -> None:
        assert set(ranks) <= self.active
        self.active -= set(ranks)

    async def expand(self, ranks: list[int]) -> None:
        self.active |= set(ranks)

    def ranks(self) -> list[int]:
        return sorted(self.active)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_scheduler_actor_seed003_boundary_and_errors(ray_local):
    async def main() -> None:
        sched = create_scheduler_actor(4, default_timeout_s=30.0, controller_timeout_s=30.0)
        engines = {pid: EngineStub.remote() for pid in ("p1", "p2")}
        for pid, train in (("p1", [0, 1]), ("p2", [2, 3])):
            spec = PipelineSpec(pid, clusters={"actor_train": ClusterSpec(gpus=train),
                                               "actor_infer": ClusterSpec(gpus=[0, 1, 2, 3], generation=True)})
            await sched.register_pipeline.remote(spec, engines[pid])

        async def pipeline(pid: str) -> None:
            for _ in range(2):
                ranks = await sched.request_gpus.remote(pid, "actor_infer", Priority.GENERATION,
                                                        step_target=4, timeout_s=30)
                assert ranks
                await sched.report_progress.remote(pid, 4)
                await sched.release_then_request.remote(pid, release="actor_infer", request="actor_train",
                                                        priority=Priority.ACTOR_TRAINING, timeout_s=30)
                assert await engines[pid].ranks.remote() == []
                await sched.release_gpus.remote(pid, "actor_train")

        await asyncio.gather(pipeline("p1"), pipeline("p2"))
        snap = await sched.snapshot.remote()
        assert snap["idle"] == [0, 1, 2, 3] and snap["dead"] == {}
        with pytest.raises(SpecError, match="step_target=None"):
            await sched.request_gpus.remote("p1", "actor_infer", Priority.GENERATION)
        await sched.unregister_pipeline.remote("p1")
        assert "p1" not in (await sched.snapshot.remote())["allocations"]
        await sched.close.remote()
        ray.kill(sched)

    asyncio.run(main())
