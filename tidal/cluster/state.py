"""Scheduler state, plans, and the invariants that guard them.

The state is plain data mutated only through the methods below (the service, the simulator and
the tests all go through them). A plan is what the planner proposes; `validate_plan` checks it
against the state before anything is applied, and `SchedulerState.check` checks the state after.

Invariants (`check`):
  I1  a training-side allocation is exactly its cluster's declared GPUs, and owns them alone;
  I2  a GPU is held by at most one settled replica (active or shrinking) and at most one expanding
      replica; both at once only while the settled one is shrinking (a handoff in flight);
  I3  a pipeline's active / shrinking / expanding ranks are disjoint and inside its replicas,
      and every replica is exactly tp GPUs of the generation cluster;
  I4  idle ∪ allocated = all GPUs, and the two are disjoint;
  I5  a dead pipeline owns nothing and has no pending request; a pending request names a live
      pipeline's training-side cluster that it does not hold.
Plan checks (`validate_plan`): grants take only idle GPUs inside the requested cluster; shrink
only settled active replicas; expand only inactive replicas, onto GPUs that are idle or being
handed over by a shrink; no GPU claimed twice.

One job past 400 lines: the state, the plan types and the invariants checked after every plan are
one contract."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

from tidal.cluster.types import (
    ClusterSpec,
    PipelineDeadError,
    PipelineSpec,
    PlanInvariantError,
    Priority,
    SpecError,
    UnknownPipelineError,
)


@dataclass(slots=True)
class GpuRequest:
    """A pending training-side request (generation demand lives in `Generation`)."""

    seq: int
    pipeline_id: str
    cluster: str
    priority: Priority
    gpus: tuple[int, ...]
    enqueued_at: float = 0.0


@dataclass(slots=True)
class Generation:
    """The generation cluster of one pipeline and its rollout demand.

    `open` is the durable demand signal: set by request_gpus(GENERATION, step_target=N), cleared
    only by releasing the generation cluster or clear_progress.
    """

    cluster: str
    spec: ClusterSpec
    active: set[int] = field(default_factory=set)
    shrinking: set[int] = field(default_factory=set)
    expanding: set[int] = field(default_factory=set)
    open: bool = False
    step_target: int = 0
    completed: int = 0
    releasing: bool = False

    @property
    def remaining(self) -> int:
        return max(self.step_target - self.completed, 0)

    @property
    def needed(self) -> int:
        """Replicas the remaining samples can keep busy: at least one, and every replica when the
        cluster does not say how many samples a replica runs at once (max_num_seqs=None)."""
        per = self.spec.max_num_seqs
        return self.spec.num_replicas if per is None else -(-max(self.remaining, 1) // per)

    @property
    def current(self) -> int:
        """Replicas that count toward the pipeline's share: up, or coming up."""
        return len(self.active) + len(self.expanding)

    def busy(self) -> bool:
        return bool(self.active or self.shrinking or self.expanding)


@dataclass(slots=True)
class PipelineState:
    spec: PipelineSpec
    gen: Generation | None
    held: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dead: str | None = None


@dataclass(slots=True)
class Plan:
    grants: list[GpuRequest] = field(default_factory=list)
    shrinks: dict[str, list[int]] = field(default_factory=dict)
    expands: dict[str, list[int]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.grants or self.shrinks or self.expands)

    def __str__(self) -> str:
        g = [f"{q.pipeline_id}/{q.cluster}#{q.seq}" for q in self.grants]
        return f"Plan(grants={g}, shrinks={self.shrinks}, expands={self.expands})"


def _gen_of(ps: PipelineState, pipeline_id: str) -> Generation:
    if ps.gen is None:
        raise SpecError(
            f"pipeline {pipeline_id!r} has no generation cluster, expected one with "
            f"ClusterSpec(generation=True) for generation demand"
        )
    return ps.gen


def _fail(invariant: str, detail: str, plan: Plan | None = None) -> NoReturn:
    msg = f"invariant {invariant} broken: {detail}"
    if plan is not None:
        msg += f"; plan={plan}"
    raise PlanInvariantError(msg)


@dataclass(slots=True)
class Topology:
    """What the registered specs imply, derived once per register/unregister for the planner.

    `group[pid]` numbers the groups of pipelines whose generation clusters overlap (transitively);
    `gpu_group[g]` is the group whose generation GPUs include g (-1: none); `shape[pid]` numbers the
    distinct generation clusters (same GPUs, same tp), so per-cluster work is done once for
    pipelines that share one; `first_gpu[pid]` is the lowest GPU of its generation cluster.
    """

    group: dict[str, int]
    gpu_group: list[int]
    shape: dict[str, int] = field(default_factory=dict)
    first_gpu: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, num_gpus: int, pipelines: dict[str, PipelineState]) -> Topology:
        gens = {pid: ps.gen.spec for pid, ps in pipelines.items() if ps.gen is not None and ps.dead is None}
        # pipelines that declare one and the same generation cluster are one shape: the GPU scan is
        # per shape (256 pipelines all on 4,096 GPUs scan 4,096 GPUs, not a million replica slots)
        shapes: dict[tuple[tuple[int, ...], int], int] = {}
        shape = {pid: shapes.setdefault((spec.gpus, spec.tp), len(shapes)) for pid, spec in gens.items()}
        parent = list(range(len(shapes)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        seen = [-1] * num_gpus  # the first shape whose generation GPUs include g
        for (gpus, tp), i in shapes.items():
            for g in gpus[: len(gpus) - len(gpus) % tp]:  # GPUs of whole replicas only
                if seen[g] < 0:
                    seen[g] = i
                else:
                    a, b = find(i), find(seen[g])
                    if a != b:
                        parent[a] = b
        ids: dict[int, int] = {}
        group = {pid: ids.setdefault(find(i), len(ids)) for pid, i in shape.items()}
        gpu_group = [ids[find(i)] if i >= 0 else -1 for i in seen]
        lowest = {i: min(gpus) for (gpus, _), i in shapes.items()}
        return cls(group, gpu_group, shape, {pid: lowest[i] for pid, i in shape.items()})


@dataclass(slots=True)
class SchedulerState:
    num_gpus: int
    pipelines: dict[str, PipelineState] = field(default_factory=dict)
    pending: dict[int, GpuRequest] = field(default_factory=dict)
    next_seq: int = 0
    _topology: Topology | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.num_gpus, int) or self.num_gpus < 1:
            raise SpecError(f"num_gpus={self.num_gpus!r}: expected a positive int")

    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = Topology.build(self.num_gpus, self.pipelines)
        return self._topology

    # ---- lookups -----------------------------------------------------------------------------

    def pipeline(self, pipeline_id: str, alive: bool = True) -> PipelineState:
        ps = self.pipelines.get(pipeline_id)
        if ps is None:
            raise UnknownPipelineError(
                f"pipeline_id={pipeline_id!r}: unknown pipeline, expected one of {sorted(self.pipelines)}"
            )
        if alive and ps.dead is not None:
            raise PipelineDeadError(
                f"pipeline_id={pipeline_id!r} is dead ({ps.dead}); expected a live "
                f"pipeline: unregister it and register again"
            )
        return ps

    def cluster(self, pipeline_id: str, cluster: str) -> ClusterSpec:
        ps = self.pipeline(pipeline_id)
        spec = ps.spec.clusters.get(cluster)
        if spec is None:
            raise SpecError(
                f"cluster={cluster!r}: not a cluster of pipeline {pipeline_id!r}, expected one of "
                f"{sorted(ps.spec.clusters)}"
            )
        return spec

    def owners(self) -> list[list[tuple[str, str | int, str]]]:
        """Per GPU: (pipeline, cluster name or replica rank, 'held'|'active'|'shrinking'|'expanding')."""
        own: list[list[tuple[str, str | int, str]]] = [[] for _ in range(self.num_gpus)]
        for pid, ps in self.pipelines.items():
            for name, gpus in ps.held.items():
                for g in gpus:
                    own[g].append((pid, name, "held"))
            gen = ps.gen
            if gen is None:
                continue
            for status, ranks in (("active", gen.active), ("shrinking", gen.shrinking), ("expanding", gen.expanding)):
                for r in ranks:
                    for g in gen.spec.replica(r):
                        own[g].append((pid, r, status))
        return own

    def occupancy(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """Per GPU, how many training-side allocations, active, shrinking and expanding replicas
        sit on it: owners() as counts, without a tuple per owner (checked after every plan)."""
        n = self.num_gpus
        held, active, shrinking, expanding = [0] * n, [0] * n, [0] * n, [0] * n
        for ps in self.pipelines.values():
            for gpus in ps.held.values():
                for g in gpus:
                    held[g] += 1
            gen = ps.gen
            if gen is None:
                continue
            for count, ranks in ((active, gen.active), (shrinking, gen.shrinking), (expanding, gen.expanding)):
                for r in ranks:
                    for g in gen.spec.replica(r):
                        count[g] += 1
        return held, active, shrinking, expanding

    def idle_gpus(self) -> list[int]:
        return [g for g, o in enumerate(self.owners()) if not o]

    # ---- events --------------------------------------------------------------------------------

    def register(self, spec: PipelineSpec) -> PipelineState:
        if spec.pipeline_id in self.pipelines:
            raise SpecError(f"pipeline_id={spec.pipeline_id!r} is already registered, expected a new id")
        spec.validate(self.num_gpus)
        name = spec.generation_cluster
        gen = Generation(cluster=name, spec=spec.clusters[name]) if name is not None else None
        ps = PipelineState(spec=spec, gen=gen)
        self.pipelines[spec.pipeline_id] = ps
        self._topology = None
        return ps

    def unregister(self, pipeline_id: str) -> list[int]:
        """Forget the pipeline and give its GPUs back; returns the seqs of its dropped requests."""
        self.pipeline(pipeline_id, alive=False)
        dropped = self._drop_requests(pipeline_id)
        del self.pipelines[pipeline_id]
        self._topology = None
        return dropped

    def kill(self, pipeline_id: str, reason: str) -> list[int]:
        """Mark the pipeline dead and give all its GPUs back; returns the seqs of its dropped requests."""
        ps = self.pipelines.get(pipeline_id)
        if ps is None or ps.dead is not None:
            return []
        ps.dead = reason
        self._topology = None
        ps.held.clear()
        if ps.gen is not None:
            ps.gen.active.clear()
            ps.gen.shrinking.clear()
            ps.gen.expanding.clear()
            ps.gen.open = False
            ps.gen.releasing = False
        return self._drop_requests(pipeline_id)

    def _drop_requests(self, pipeline_id: str) -> list[int]:
        seqs = [s for s, q in self.pending.items() if q.pipeline_id == pipeline_id]
        for s in seqs:
            del self.pending[s]
        return seqs

    def add_request(self, pipeline_id: str, cluster: str, priority: Priority, now: float = 0.0) -> GpuRequest:
        spec = self.cluster(pipeline_id, cluster)
        if spec.generation or priority == Priority.GENERATION:
            raise SpecError(
                f"cluster={cluster!r} priority={Priority(priority).name}: training-side requests "
                f"need a non-generation cluster and a priority above GENERATION"
            )
        if cluster in self.pipelines[pipeline_id].held:
            raise SpecError(
                f"cluster={cluster!r}: pipeline {pipeline_id!r} already holds it, expected a "
                f"release before requesting it again"
            )
        for q in self.pending.values():
            if q.pipeline_id == pipeline_id and q.cluster == cluster:
                raise SpecError(
                    f"cluster={cluster!r}: pipeline {pipeline_id!r} already has a pending "
                    f"request #{q.seq} for it, expected one request at a time"
                )
        q = GpuRequest(self.next_seq, pipeline_id, cluster, Priority(priority), spec.gpus, now)
        self.next_seq += 1
        self.pending[q.seq] = q
        return q

    def open_generation(self, pipeline_id: str, step_target: int) -> Generation:
        gen = self._gen(pipeline_id)
        if not isinstance(step_target, int) or step_target < 1:
            raise SpecError(f"step_target={step_target!r}: expected a positive int for a GENERATION request")
        if not gen.open:
            gen.completed = 0
        gen.open = True
        gen.step_target = step_target
        return gen

    def report_progress(self, pipeline_id: str, completed: int, target: int | None = None) -> None:
        gen = self._gen(pipeline_id)
        if not isinstance(completed, int) or completed < 0:
            raise SpecError(f"completed={completed!r}: expected a non-negative int")
        if target is not None:
            if not isinstance(target, int) or target < 1:
                raise SpecError(f"target={target!r}: expected a positive int or None")
            gen.step_target = target
        gen.completed = completed

    def clear_progress(self, pipeline_id: str) -> None:
        gen = self._gen(pipeline_id)
        gen.open = False
        gen.completed = 0
        gen.step_target = 0

    def release(self, pipeline_id: str, cluster: str) -> bool:
        """Give a cluster back. Returns True when generation replicas still have to shrink first."""
        spec = self.cluster(pipeline_id, cluster)
        ps = self.pipelines[pipeline_id]
        if not spec.generation:
            ps.held.pop(cluster, None)
            return False
        gen = _gen_of(ps, pipeline_id)
        gen.open = False
        gen.completed = 0
        gen.step_target = 0
        gen.releasing = gen.busy()
        return gen.releasing

    def _gen(self, pipeline_id: str) -> Generation:
        return _gen_of(self.pipeline(pipeline_id), pipeline_id)

    # ---- plan lifecycle --------------------------------------------------------------------------

    def begin(self, plan: Plan) -> None:
        """Apply the synchronous part of a validated plan: grants, and mark shrinks/expands in flight."""
        for q in plan.grants:
            del self.pending[q.seq]
            self.pipelines[q.pipeline_id].held[q.cluster] = q.gpus
        for pid, ranks in plan.shrinks.items():
            gen = _gen_of(self.pipelines[pid], pid)
            gen.active.difference_update(ranks)
            gen.shrinking.update(ranks)
        for pid, ranks in plan.expands.items():
            _gen_of(self.pipelines[pid], pid).expanding.update(ranks)

    def live_gen(self, pipeline_id: str) -> Generation | None:
        ps = self.pipelines.get(pipeline_id)
        return None if ps is None or ps.dead is not None else ps.gen

    def finish_shrink(self, pipeline_id: str, ranks: list[int]) -> None:
        gen = self.live_gen(pipeline_id)
        if gen is not None:
            gen.shrinking.difference_update(ranks)
            gen.releasing = gen.releasing and gen.busy()

    def finish_expand(self, pipeline_id: str, ranks: list[int]) -> None:
        gen = self.live_gen(pipeline_id)
        if gen is not None:
            mine = [r for r in ranks if r in gen.expanding]
            gen.expanding.difference_update(mine)
            gen.active.update(mine)

    def cancel_expand(self, pipeline_id: str, ranks: list[int]) -> None:
        gen = self.live_gen(pipeline_id)
        if gen is not None:
            gen.expanding.difference_update(ranks)
            gen.releasing = gen.releasing and gen.busy()

    def expand_ready(self, pipeline_id: str, ranks: list[int]) -> bool:
        """True when no other replica still sits on the GPUs these expanding ranks will take."""
        gen = self.live_gen(pipeline_id)
        if gen is None:
            return True
        want = {g for r in ranks for g in gen.spec.replica(r)}
        for pid, ps in self.pipelines.items():
            other = ps.gen
            if other is None or pid == pipeline_id or not other.shrinking:
                continue
            for r in other.shrinking:
                if want.intersection(other.spec.replica(r)):
                    return False
        return True

    # ---- invariants ------------------------------------------------------------------------------

    def check(self, plan: Plan | None = None) -> None:
        """Raise PlanInvariantError (naming `plan`, if given) when an invariant I1-I5 is broken."""
        for pid, ps in self.pipelines.items():
            gen = ps.gen
            if ps.dead is not None and (ps.held or (gen is not None and gen.busy())):
                _fail("I5", f"dead pipeline {pid!r} still owns GPUs", plan)
            for name, gpus in ps.held.items():
                spec = ps.spec.clusters.get(name)
                if spec is None or spec.generation or tuple(gpus) != spec.gpus:
                    _fail(
                        "I1",
                        f"pipeline {pid!r} holds {name!r}={list(gpus)}, expected its declared training-side GPUs",
                        plan,
                    )
            if gen is None:
                continue
            n = gen.spec.num_replicas
            sets = (gen.active, gen.shrinking, gen.expanding)
            if (gen.active & gen.shrinking) or (gen.active & gen.expanding) or (gen.shrinking & gen.expanding):
                _fail(
                    "I3",
                    f"pipeline {pid!r}: active={sorted(gen.active)} shrinking={sorted(gen.shrinking)} "
                    f"expanding={sorted(gen.expanding)} overlap",
                    plan,
                )
            for s in sets:
                for r in s:
                    if not (isinstance(r, int) and 0 <= r < n) or len(gen.spec.replica(r)) != gen.spec.tp:
                        _fail(
                            "I3",
                            f"pipeline {pid!r}: rank {r!r} is not a replica of {gen.spec.tp} GPUs "
                            f"(expected 0 <= rank < {n})",
                            plan,
                        )
        held, active, shrinking, expanding = self.occupancy()
        for g, h, a, sh, e in zip(range(self.num_gpus), held, active, shrinking, expanding):
            if h + a + sh + e <= 1:
                continue
            if h:
                _fail("I1", f"gpu {g} owned twice: {self.owners()[g]}", plan)
            if a + sh > 1 or e > 1 or sh != 1:
                _fail("I2", f"gpu {g} owned twice: {self.owners()[g]}", plan)
        # I4 (idle and allocated partition the pool) holds by construction of the counts above
        for seq, q in self.pending.items():
            owner = self.pipelines.get(q.pipeline_id)
            if seq != q.seq or owner is None or owner.dead is not None or q.cluster in owner.held:
                _fail("I5", f"pending request #{seq} {q.pipeline_id}/{q.cluster} is stale", plan)


def validate_plan(state: SchedulerState, plan: Plan) -> None:
    """Check a plan against the state before it is applied; raise PlanInvariantError naming it."""
    held, active, shrinking, expanding = state.occupancy()
    claimed: set[int] = set()
    for q in plan.grants:
        cur = state.pending.get(q.seq)
        ps = state.pipelines.get(q.pipeline_id)
        if cur is not q or ps is None or ps.dead is not None:
            _fail("P1", f"grant #{q.seq} is not a pending request of a live pipeline", plan)
        spec = ps.spec.clusters[q.cluster]
        if spec.generation or tuple(q.gpus) != spec.gpus:
            _fail(
                "P1",
                f"grant {q.pipeline_id}/{q.cluster}={list(q.gpus)} is not the cluster's declared "
                f"training-side GPUs {list(spec.gpus)}",
                plan,
            )
        for g in q.gpus:
            if held[g] or active[g] or shrinking[g] or expanding[g] or g in claimed:
                _fail(
                    "P1",
                    f"grant {q.pipeline_id}/{q.cluster} takes gpu {g}, which is not idle: "
                    f"{state.owners()[g] or 'granted twice in this plan'}",
                    plan,
                )
            claimed.add(g)
    shrunk: set[int] = set()
    for pid, ranks in plan.shrinks.items():
        gen = _plan_gen(state, pid, plan)
        if not ranks or len(set(ranks)) != len(ranks) or not set(ranks) <= gen.active:
            _fail(
                "P2", f"shrink {pid} ranks {ranks}: expected distinct settled active ranks {sorted(gen.active)}", plan
            )
        for r in ranks:
            shrunk.update(gen.spec.replica(r))
    for pid, ranks in plan.expands.items():
        gen = _plan_gen(state, pid, plan)
        busy = gen.active | gen.shrinking | gen.expanding
        if not ranks or len(set(ranks)) != len(ranks) or busy.intersection(ranks):
            _fail("P3", f"expand {pid} ranks {ranks}: expected distinct inactive ranks (busy {sorted(busy)})", plan)
        for r in ranks:
            if not (isinstance(r, int) and 0 <= r < gen.spec.num_replicas):
                _fail("P3", f"expand {pid} rank {r!r}: expected 0 <= rank < {gen.spec.num_replicas}", plan)
            gpus = gen.spec.replica(r)
            if len(gpus) != gen.spec.tp:
                _fail("P3", f"expand {pid} rank {r}: replica {list(gpus)} is not {gen.spec.tp} GPUs", plan)
            for g in gpus:
                if g in claimed:
                    _fail("P3", f"expand {pid} rank {r} claims gpu {g} twice in this plan", plan)
                claimed.add(g)
                # only a replica that is shrinking (already, or in this plan) may hand a GPU over
                if held[g] or expanding[g] or (active[g] and g not in shrunk):
                    _fail("P3", f"expand {pid} rank {r} claims gpu {g} owned by {state.owners()[g]}", plan)


def _plan_gen(state: SchedulerState, pid: str, plan: Plan) -> Generation:
    ps = state.pipelines.get(pid)
    if ps is None or ps.dead is not None or ps.gen is None:
        _fail("P0", f"plan names pipeline {pid!r}, expected a live pipeline with a generation cluster", plan)
    return ps.gen
