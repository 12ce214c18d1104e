"""GpuScheduler: the asyncio service that owns the state, runs the planner and applies its plans.

One loop task plans; plans are applied in two parts. The synchronous part (grants, marking
replicas in flight) happens right after validation. Shrink and expand calls then go out as tasks,
concurrently, outside any lock; each commits its result when it returns and wakes the loop. A
pipeline's own controller calls are serialized. A controller that raises or times out kills only
its pipeline: its GPUs go back to the pool and its waiting calls fail with the error.

One job past 400 lines: the service's event handlers and the application of a plan share the one
state they mutate."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tidal.cluster.planner import PlannerConfig, plan
from tidal.cluster.state import SchedulerState, validate_plan
from tidal.cluster.types import (
    ClusterSpec,
    ControllerError,
    GenerationController,
    PipelineDeadError,
    PipelineSpec,
    Priority,
    ReleaseUnverified,
    SchedulerError,
    SchedulerTimeoutError,
    SpecError,
)

log = logging.getLogger(__name__)


class GpuScheduler:
    def __init__(
        self,
        num_gpus: int,
        config: PlannerConfig = PlannerConfig(),
        *,
        default_timeout_s: float = 600.0,
        controller_timeout_s: float = 120.0,
    ):
        self.state = SchedulerState(num_gpus)
        self.config = config
        self.default_timeout_s = default_timeout_s
        self.controller_timeout_s = controller_timeout_s
        self._controllers: dict[str, GenerationController] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._grants: dict[int, asyncio.Future] = {}
        self._waiters: dict[str, list[tuple[Callable[[], bool], asyncio.Future]]] = {}
        self._wake = asyncio.Event()
        self._changes: list[asyncio.Future] = []
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._broken: BaseException | None = None
        self.plans = 0
        self.quarantined: dict[str, str] = {}  # placeholder pipeline id -> why its GPUs are held

    # ---- public API ----------------------------------------------------------------------------

    async def register_pipeline(self, spec: PipelineSpec, generation: GenerationController | None = None) -> None:
        self._ensure_running()
        if spec.generation_cluster is not None and generation is None:
            raise SpecError(
                f"pipeline {spec.pipeline_id!r}: generation=None, expected a GenerationController "
                f"for generation cluster {spec.generation_cluster!r}"
            )
        self.state.register(spec)
        if generation is not None:
            self._controllers[spec.pipeline_id] = generation
        self._locks[spec.pipeline_id] = asyncio.Lock()

    async def unregister_pipeline(self, pipeline_id: str) -> None:
        """Forget the pipeline and give its GPUs back at once; its waiting calls fail."""
        self._check_broken()
        dropped = self.state.unregister(pipeline_id)
        err = PipelineDeadError(f"pipeline_id={pipeline_id!r} was unregistered")
        self._fail_pipeline(pipeline_id, dropped, err)
        self._controllers.pop(pipeline_id, None)
        self._locks.pop(pipeline_id, None)
        self._kick()

    async def request_gpus(
        self,
        pipeline_id: str,
        cluster: str,
        priority: Priority,
        *,
        step_target: int | None = None,
        timeout_s: float | None = None,
    ) -> list[int]:
        """Training-side cluster: block until granted, return its GPU ids. Generation cluster: open
        durable demand of `step_target` samples, block until >= 1 replica is up, return active ranks."""
        self._ensure_running()
        self._check_broken()
        self._check_request(pipeline_id, cluster, priority, step_target)
        ticket = self._enqueue(pipeline_id, cluster, priority, step_target)
        return await self._await_ticket(ticket, timeout_s)

    def _check_request(self, pipeline_id: str, cluster: str, priority: Priority, step_target: int | None) -> None:
        spec = self.state.cluster(pipeline_id, cluster)
        if spec.generation:
            if priority != Priority.GENERATION:
                raise SpecError(
                    f"priority={Priority(priority).name} for generation cluster {cluster!r}, expected GENERATION"
                )
            if not isinstance(step_target, int) or step_target < 1:
                raise SpecError(
                    f"step_target={step_target!r} for generation cluster {cluster!r}, expected the "
                    f"number of samples this rollout needs (a positive int)"
                )
        elif step_target is not None:
            raise SpecError(f"step_target={step_target!r} for training-side cluster {cluster!r}, expected None")

    def _enqueue(self, pipeline_id: str, cluster: str, priority: Priority, step_target: int | None) -> tuple:
        """The synchronous half of a request: after it returns the planner sees the demand."""
        ticket: tuple  # ("gen", pipeline, cluster, generation) | ("grant", pipeline, cluster, request, future)
        if step_target is not None:
            gen = self.state.open_generation(pipeline_id, step_target)
            ticket = ("gen", pipeline_id, cluster, gen)
        else:
            q = self.state.add_request(pipeline_id, cluster, priority, self._now())
            fut = asyncio.get_running_loop().create_future()
            self._grants[q.seq] = fut
            ticket = ("grant", pipeline_id, cluster, q, fut)
        self._kick()
        return ticket

    async def _await_ticket(self, ticket: tuple, timeout_s: float | None) -> list[int]:
        if ticket[0] == "gen":
            _, pid, cluster, gen = ticket
            await self._wait_for(
                pid, lambda: bool(gen.active), timeout_s, f"request_gpus({pid!r}, {cluster!r}, GENERATION)"
            )
            return sorted(gen.active)
        _, pid, cluster, q, fut = ticket
        try:
            done, _ = await asyncio.wait({fut}, timeout=self._timeout(timeout_s))
        except asyncio.CancelledError:
            self._abandon(q, fut)
            raise
        if not done:
            self._abandon(q, fut)
            raise SchedulerTimeoutError(
                f"request_gpus({pid!r}, {cluster!r}, {q.priority.name}): not granted within "
                f"timeout_s={self._timeout(timeout_s)}; waiting on {self._holders(q.gpus)}"
            )
        return fut.result()

    def _abandon(self, q, fut: asyncio.Future) -> None:
        """The caller gave up (timeout, cancel): drop the request, or give back a grant it never saw."""
        self._grants.pop(q.seq, None)
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.state.release(q.pipeline_id, q.cluster)
        else:
            self.state.pending.pop(q.seq, None)
            fut.cancel()
        self._kick()

    async def release_gpus(self, pipeline_id: str, cluster: str, *, timeout_s: float | None = None) -> None:
        """Give a cluster back. For the generation cluster this closes demand and returns once its
        replicas have been shrunk through the controller."""
        self._check_broken()
        must_wait = self.state.release(pipeline_id, cluster)
        self._kick()
        gen = self.state.pipelines[pipeline_id].gen
        if must_wait and gen is not None:
            await self._wait_for(
                pipeline_id, lambda: not gen.releasing, timeout_s, f"release_gpus({pipeline_id!r}, {cluster!r})"
            )

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
        """Release one cluster and queue the next request in the same step, so no other pipeline's
        request can slip in between (only a higher-priority one that was already waiting)."""
        self._ensure_running()
        self._check_broken()
        self.state.cluster(pipeline_id, release)
        self._check_request(pipeline_id, request, priority, step_target)
        must_wait = self.state.release(pipeline_id, release)
        ticket = self._enqueue(pipeline_id, request, priority, step_target)
        got = asyncio.ensure_future(self._await_ticket(ticket, timeout_s))
        try:
            gen = self.state.pipelines[pipeline_id].gen
            if must_wait and gen is not None:
                await self._wait_for(
                    pipeline_id,
                    lambda: not gen.releasing,
                    timeout_s,
                    f"release_then_request({pipeline_id!r}, release={release!r})",
                )
            return await got
        finally:
            if not got.done():
                got.cancel()

    def report_progress(self, pipeline_id: str, completed: int, target: int | None = None) -> None:
        self.state.report_progress(pipeline_id, completed, target)
        self._kick()

    def clear_progress(self, pipeline_id: str) -> None:
        self.state.clear_progress(pipeline_id)
        self._kick()

    def snapshot(self) -> dict[str, Any]:
        st = self.state
        own = st.owners()
        return {
            "num_gpus": st.num_gpus,
            "idle": [g for g, o in enumerate(own) if not o],
            "gpus": {g: [f"{p}/{c}:{s}" for p, c, s in o] for g, o in enumerate(own) if o},
            "allocations": {pid: {name: list(g) for name, g in ps.held.items()} for pid, ps in st.pipelines.items()},
            "generation": {
                pid: {
                    "cluster": ps.gen.cluster,
                    "active": sorted(ps.gen.active),
                    "shrinking": sorted(ps.gen.shrinking),
                    "expanding": sorted(ps.gen.expanding),
                    "open": ps.gen.open,
                    "step_target": ps.gen.step_target,
                    "completed": ps.gen.completed,
                    "remaining": ps.gen.remaining,
                    "releasing": ps.gen.releasing,
                }
                for pid, ps in st.pipelines.items()
                if ps.gen is not None
            },
            "demand": {pid: ps.gen.remaining for pid, ps in st.pipelines.items() if ps.gen is not None and ps.gen.open},
            "pending": [
                {
                    "seq": q.seq,
                    "pipeline": q.pipeline_id,
                    "cluster": q.cluster,
                    "priority": q.priority.name,
                    "gpus": list(q.gpus),
                    "waited_s": round(self._now() - q.enqueued_at, 3),
                }
                for q in st.pending.values()
            ],
            "dead": {pid: ps.dead for pid, ps in st.pipelines.items() if ps.dead is not None},
            "plans": self.plans,
            "quarantined": dict(self.quarantined),
            "broken": repr(self._broken) if self._broken else None,
        }

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None

    # ---- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._cycle()
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._break(e)

    def _break(self, e: BaseException) -> None:
        """A broken invariant or a bug: stop planning and fail every waiter loudly with it."""
        if self._broken is not None:
            return
        log.error("GpuScheduler stopped: %r", e)
        self._broken = e
        for fut in [*self._grants.values(), *(f for lst in self._waiters.values() for _, f in lst), *self._changes]:
            if not fut.done():
                fut.set_exception(e)

    def _cycle(self) -> None:
        st = self.state
        p = plan(st, self.config)
        if p.empty:
            return
        self.plans += 1
        validate_plan(st, p)
        st.begin(p)
        st.check(p)
        for q in p.grants:
            fut = self._grants.pop(q.seq, None)
            if fut is not None and not fut.done():
                fut.set_result(list(q.gpus))
        for pid, ranks in p.shrinks.items():
            self._spawn(self._shrink(pid, ranks))
        for pid, ranks in p.expands.items():
            self._spawn(self._expand(pid, ranks))
        self._resolve()

    async def _shrink(self, pid: str, ranks: list[int]) -> None:
        if await self._call(pid, "shrink", ranks):
            self.state.finish_shrink(pid, ranks)
        self._committed()

    async def _expand(self, pid: str, ranks: list[int]) -> None:
        st = self.state
        deadline = self._now() + 2 * self.controller_timeout_s
        while not st.expand_ready(pid, ranks):  # donors still shrinking off these GPUs
            if not await self._changed_before(deadline):
                break
        gen = st.live_gen(pid)
        if gen is None:
            return
        if (
            not st.expand_ready(pid, ranks) or not gen.open or gen.releasing or not set(ranks) <= gen.expanding
        ):  # also: cancelled by a quarantine
            st.cancel_expand(pid, ranks)  # no longer wanted (released, cleared) or handoff never came
        elif await self._call(pid, "expand", ranks):
            st.finish_expand(pid, ranks)
        self._committed()

    async def _call(self, pid: str, op: str, ranks: list[int]) -> bool:
        """Run one controller call; on error kill the pipeline. Returns True on success."""
        ctrl, lock = self._controllers.get(pid), self._locks.get(pid)
        if ctrl is None or lock is None:
            return False
        try:
            async with lock:
                if self.state.live_gen(pid) is None:
                    return False
                await asyncio.wait_for(getattr(ctrl, op)(list(ranks)), self.controller_timeout_s)
            return True
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            what = "timed out" if isinstance(e, (asyncio.TimeoutError, TimeoutError)) else f"raised {e!r}"
            err = ControllerError(
                f"pipeline {pid!r}: controller.{op}({list(ranks)}) {what}; the pipeline is "
                f"dead and its GPUs went back to the pool"
            )
            err.__cause__ = e
            log.warning("%s", err)
            dropped = self.state.kill(pid, str(err))
            if isinstance(e, ReleaseUnverified):
                self._quarantine(e.gpus, str(e))
            self._fail_pipeline(pid, dropped, err)
            return False

    def _quarantine(self, gpus: tuple[int, ...], reason: str) -> None:
        """Memory not shown released: a placeholder pipeline holds these GPUs until an operator
        unregisters it, and expands already planned onto them are cancelled."""
        gpus = tuple(g for g in gpus if 0 <= g < self.state.num_gpus)
        st = self.state
        for pid, ps in st.pipelines.items():
            if ps.gen is not None and ps.dead is None:
                st.cancel_expand(pid, [r for r in ps.gen.expanding if set(ps.gen.spec.replica(r)) & set(gpus)])
        qid = f"quarantine-{'-'.join(map(str, gpus))}-{self.plans}"
        st.register(PipelineSpec(qid, clusters={"unverified": ClusterSpec(gpus=gpus)}))
        st.pipelines[qid].held["unverified"] = gpus
        self.quarantined[qid] = reason
        log.error("GPUs %s quarantined as %r: %s", list(gpus), qid, reason)

    def _committed(self) -> None:
        self.state.check()
        changes, self._changes = self._changes, []
        for fut in changes:
            if not fut.done():
                fut.set_result(None)
        self._resolve()
        self._kick()

    # ---- waiting -----------------------------------------------------------------------------

    async def _wait_for(self, pid: str, cond: Callable[[], bool], timeout_s: float | None, what: str) -> None:
        """Return once cond() holds when this coroutine runs (not merely when it was woken)."""
        timeout = self._timeout(timeout_s)
        deadline = self._now() + timeout
        while not cond():
            left = deadline - self._now()
            if left <= 0:
                raise SchedulerTimeoutError(
                    f"{what}: not done within timeout_s={timeout}; state {self.snapshot()['generation'].get(pid)}"
                )
            fut = asyncio.get_running_loop().create_future()
            entry = (cond, fut)
            self._waiters.setdefault(pid, []).append(entry)
            try:
                await asyncio.wait({fut}, timeout=left)
            finally:
                lst = self._waiters.get(pid)
                if lst is not None and entry in lst:
                    lst.remove(entry)
            if fut.done():
                fut.result()  # raises the pipeline's death or the scheduler's failure
            else:
                fut.cancel()

    def _resolve(self) -> None:
        for lst in self._waiters.values():
            for cond, fut in lst:
                if not fut.done() and cond():
                    fut.set_result(None)

    def _fail_pipeline(self, pid: str, seqs: list[int], err: BaseException) -> None:
        for s in seqs:
            fut = self._grants.pop(s, None)
            if fut is not None and not fut.done():
                fut.set_exception(err)
        for _, fut in self._waiters.pop(pid, []):
            if not fut.done():
                fut.set_exception(err)

    async def _changed_before(self, deadline: float) -> bool:
        """Wait for the next commit; False when the deadline passes first."""
        left = deadline - self._now()
        if left <= 0:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._changes.append(fut)
        done, _ = await asyncio.wait({fut}, timeout=left)
        if not done:
            fut.cancel()
            return False
        fut.result()
        return True

    # ---- helpers -------------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._check_broken()
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="GpuScheduler")

    def _check_broken(self) -> None:
        if self._broken is not None:
            raise SchedulerError(f"the scheduler stopped after a failure: {self._broken}") from self._broken

    def _kick(self) -> None:
        self._wake.set()

    def _spawn(self, coro: Awaitable[None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        exc = None if t.cancelled() else t.exception()
        if exc is not None:
            self._break(exc)

    def _holders(self, gpus: tuple[int, ...]) -> dict[int, list[str]]:
        own = self.state.owners()
        return {g: [f"{p}/{c}:{s}" for p, c, s in own[g]] for g in gpus if own[g]}

    def _timeout(self, timeout_s: float | None) -> float:
        t = self.default_timeout_s if timeout_s is None else timeout_s
        if t <= 0:
            raise SpecError(f"timeout_s={timeout_s!r}: expected a positive number of seconds")
        return t

    @staticmethod
    def _now() -> float:
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # snapshot() called outside the loop
            return time.monotonic()
