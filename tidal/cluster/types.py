"""Specs, priorities, the generation-controller interface and the errors of tidal.cluster."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol, runtime_checkable


class Priority(IntEnum):
    """Grant order, highest first. Only GENERATION is preemptible and resizable."""

    INITIALIZATION = 0
    ACTOR_TRAINING = 1
    CRITIC_TRAINING = 2
    OLD_LOG_PROBS = 3
    REF_LOG_PROBS = 4
    VALUE_COMPUTE = 5
    GENERATION = 6


@dataclass(slots=True, frozen=True)
class ClusterSpec:
    """A named group of GPUs of one pipeline.

    A training-side cluster is granted all-or-nothing. A generation cluster is cut into
    data-parallel replicas of `tp` consecutive GPUs (replica r = gpus[r*tp:(r+1)*tp]).
    `max_num_seqs` (generation only) is how many samples one replica runs at once: the planner
    never wants more replicas than ceil(remaining / max_num_seqs), so a rollout's tail packs onto
    few replicas and the rest go to pipelines with queued samples. None: unknown, every replica
    counts as usable.
    """

    gpus: tuple[int, ...]
    tp: int = 1
    generation: bool = False
    max_num_seqs: int | None = None
    replicas: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)
    rank_of: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        gpus = tuple(self.gpus)
        object.__setattr__(self, "gpus", gpus)
        tp = self.tp if isinstance(self.tp, int) and self.tp >= 1 else 1  # validate() reports a bad tp
        object.__setattr__(self, "replicas", tuple(gpus[i : i + tp] for i in range(0, len(gpus) - tp + 1, tp)))
        object.__setattr__(self, "rank_of", {g: r for r, rep in enumerate(self.replicas) for g in rep})

    @property
    def num_replicas(self) -> int:
        return len(self.replicas)

    def replica(self, rank: int) -> tuple[int, ...]:
        return self.replicas[rank]


@dataclass(slots=True)
class PipelineSpec:
    """One RL pipeline: its training-side clusters and at most one generation cluster."""

    pipeline_id: str
    clusters: dict[str, ClusterSpec] = field(default_factory=dict)

    @property
    def generation_cluster(self) -> str | None:
        for name, c in self.clusters.items():
            if c.generation:
                return name
        return None

    def validate(self, num_gpus: int) -> None:
        pid = self.pipeline_id
        if not isinstance(pid, str) or not pid:
            raise SpecError(f"pipeline_id={pid!r}: expected a non-empty string")
        if not self.clusters:
            raise SpecError(f"pipeline {pid!r}: clusters is empty, expected at least one cluster")
        gen = [n for n, c in self.clusters.items() if c.generation]
        if len(gen) > 1:
            raise SpecError(f"pipeline {pid!r}: generation clusters {gen}, expected at most one")
        for name, c in self.clusters.items():
            where = f"pipeline {pid!r} cluster {name!r}"
            if not c.gpus:
                raise SpecError(f"{where}: gpus is empty, expected at least one GPU id")
            for g in c.gpus:
                if not isinstance(g, int) or not 0 <= g < num_gpus:
                    raise SpecError(f"{where}: gpu {g!r} is outside the pool, expected 0 <= gpu < {num_gpus}")
            if len(set(c.gpus)) != len(c.gpus):
                raise SpecError(f"{where}: gpus {list(c.gpus)} has duplicates, expected distinct GPU ids")
            if not isinstance(c.tp, int) or c.tp < 1:
                raise SpecError(f"{where}: tp={c.tp!r}, expected a positive int")
            if c.generation and len(c.gpus) % c.tp:
                raise SpecError(
                    f"{where}: tp={c.tp} does not divide the {len(c.gpus)} GPUs of the "
                    f"generation cluster, expected len(gpus) % tp == 0"
                )
            if c.max_num_seqs is not None and (
                not isinstance(c.max_num_seqs, int) or c.max_num_seqs < 1 or not c.generation
            ):
                raise SpecError(
                    f"{where}: max_num_seqs={c.max_num_seqs!r}, expected None or a positive int "
                    f"on the generation cluster"
                )
            if not c.generation and c.tp != 1:
                raise SpecError(
                    f"{where}: tp={c.tp} on a training-side cluster, expected tp=1 "
                    f"(only the generation cluster is cut into replicas)"
                )


@runtime_checkable
class GenerationController(Protocol):
    """What the scheduler calls to resize a pipeline's generation cluster.

    `shrink(ranks)` must stop those data-parallel replicas (retract or abort their requests with
    partial tokens) and free their GPU memory before it returns; `expand(ranks)` must bring them
    up ready to serve. Both are called outside any scheduler lock and may run concurrently with
    calls to other pipelines' controllers; one pipeline's calls are serialized.
    """

    async def shrink(self, ranks: list[int]) -> None: ...

    async def expand(self, ranks: list[int]) -> None: ...


class SchedulerError(Exception):
    """Base of every error tidal.cluster raises on purpose."""


class SpecError(SchedulerError, ValueError):
    """A spec or argument is malformed (bad GPU id, tp not dividing the cluster, ...)."""


class UnknownPipelineError(SchedulerError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PipelineDeadError(SchedulerError):
    """The pipeline died (its controller raised or timed out); it must unregister."""


class ControllerError(SchedulerError):
    """A pipeline's generation controller raised or timed out during shrink/expand."""


class ReleaseUnverified(ControllerError):
    """A shrunk replica's memory could not be shown released: the scheduler never hands `gpus` on."""

    def __init__(self, message: str, gpus: tuple[int, ...]) -> None:
        super().__init__(message)
        self.gpus = tuple(gpus)


class PlanInvariantError(SchedulerError, AssertionError):
    """A plan, or the state after applying one, broke an invariant. Always a bug."""


class SchedulerTimeoutError(SchedulerError, TimeoutError):
    """A call's deadline (timeout_s) passed before it could complete."""
