"""GPU time-sharing across RL pipelines (DESIGN.md §7).

`GpuScheduler` hands a shared GPU pool between pipelines that alternate generation and training;
`plan` is its pure planner; `tidal.cluster.ray` runs the same scheduler as a Ray actor and
`tidal.cluster.sim` simulates pipelines on a virtual clock.
"""

from tidal.cluster.gpu_scheduler import GpuScheduler
from tidal.cluster.planner import PlannerConfig, plan
from tidal.cluster.state import Plan, SchedulerState, validate_plan
from tidal.cluster.types import (
    ClusterSpec,
    ControllerError,
    GenerationController,
    PipelineDeadError,
    PipelineSpec,
    PlanInvariantError,
    Priority,
    ReleaseUnverified,
    SchedulerError,
    SchedulerTimeoutError,
    SpecError,
    UnknownPipelineError,
)

__all__ = [
    "ClusterSpec",
    "ControllerError",
    "GenerationController",
    "GpuScheduler",
    "PipelineDeadError",
    "PipelineSpec",
    "Plan",
    "PlanInvariantError",
    "PlannerConfig",
    "Priority",
    "SchedulerError",
    "ReleaseUnverified",
    "SchedulerState",
    "SchedulerTimeoutError",
    "SpecError",
    "UnknownPipelineError",
    "plan",
    "validate_plan",
]
