"""The GpuScheduler as a Ray actor, for pools that span machines.

    sched = create_scheduler_actor(num_gpus=16, name="tidal-gpu-scheduler")
    await sched.register_pipeline.remote(spec, engine_handle)   # an actor with async shrink/expand
    gpus = await sched.request_gpus.remote("p1", "actor_train", Priority.ACTOR_TRAINING)

The actor is async (one event loop, many concurrent calls), so a request that blocks never holds
up the others. It is created with max_restarts=0: its state lives in memory, and a silently
restarted scheduler would hand out GPUs that running pipelines still hold.
"""

from __future__ import annotations

from typing import Any

import ray

from tidal.cluster.gpu_scheduler import GpuScheduler
from tidal.cluster.planner import PlannerConfig
from tidal.cluster.types import PipelineSpec, Priority


class RayGenerationController:
    """Adapts a Ray actor handle whose `shrink(ranks)` / `expand(ranks)` methods do the work."""

    def __init__(self, handle: Any):
        self.handle = handle

    async def shrink(self, ranks: list[int]) -> None:
        await self.handle.shrink.remote(ranks)

    async def expand(self, ranks: list[int]) -> None:
        await self.handle.expand.remote(ranks)


class SchedulerActor:
    """The body of the Ray actor: every public GpuScheduler call, awaited in the actor's loop."""

    def __init__(self, num_gpus: int, config: PlannerConfig | None = None, **kwargs: Any):
        self._args = (num_gpus, config or PlannerConfig())
        self._kwargs = kwargs
        self._sched: GpuScheduler | None = None

    @property
    def sched(self) -> GpuScheduler:
        if self._sched is None:  # built inside the actor's event loop
            self._sched = GpuScheduler(*self._args, **self._kwargs)
        return self._sched

    async def register_pipeline(self, spec: PipelineSpec, generation: Any = None) -> None:
        ctrl = None if generation is None else RayGenerationController(generation)
        await self.sched.register_pipeline(spec, generation=ctrl)

    async def unregister_pipeline(self, pipeline_id: str) -> None:
        await self.sched.unregister_pipeline(pipeline_id)

    async def request_gpus(
        self,
        pipeline_id: str,
        cluster: str,
        priority: Priority,
        *,
        step_target: int | None = None,
        timeout_s: float | None = None,
    ) -> list[int]:
        return await self.sched.request_gpus(
            pipeline_id, cluster, priority, step_target=step_target, timeout_s=timeout_s
        )

    async def release_gpus(self, pipeline_id: str, cluster: str, *, timeout_s: float | None = None) -> None:
        await self.sched.release_gpus(pipeline_id, cluster, timeout_s=timeout_s)

    async def release_then_request(
        self,
        pipeline_id: str,
        *,
        release: str,
        request: str,
        priority: Priority,
        step_target: int | None = None,
        timeout_s: float | None = None,
    ) -> list[int]:
        return await self.sched.release_then_request(
            pipeline_id,
            release=release,
            request=request,
            priority=priority,
            step_target=step_target,
            timeout_s=timeout_s,
        )

    async def report_progress(self, pipeline_id: str, completed: int, target: int | None = None) -> None:
        self.sched.report_progress(pipeline_id, completed, target)

    async def clear_progress(self, pipeline_id: str) -> None:
        self.sched.clear_progress(pipeline_id)

    async def snapshot(self) -> dict[str, Any]:
        return self.sched.snapshot()

    async def close(self) -> None:
        await self.sched.close()


GpuSchedulerActor = ray.remote(SchedulerActor)


def create_scheduler_actor(
    num_gpus: int, *, name: str | None = None, config: PlannerConfig | None = None, **kwargs: Any
):
    """Start the scheduler actor (num_cpus=0: it only does bookkeeping). Returns its handle."""
    opts: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "max_task_retries": 0, "max_concurrency": 1000}
    if name is not None:
        opts["name"] = name
    return GpuSchedulerActor.options(**opts).remote(num_gpus, config, **kwargs)
