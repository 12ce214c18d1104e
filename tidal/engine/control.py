"""The control plane (DESIGN.md §5): pause modes, resume, abort, sleep/wake, transactional weight
updates, state. Every handler here runs on the core thread: a ControlCall in the inbox carries a
typed message (engine/control_ops.py), `handle` picks the handler by the message's type, and the
handler returns the op's typed result (or None, and completes the reply later). So nothing in it
needs a lock and nothing can run a forward pass concurrently.

Why drain cannot deadlock (docs/architecture.md, "Control plane"): pausing never blocks the
loop. `pause(drain)` only flips the state to DRAINING and records a deadline; the loop keeps
stepping and `poll()` completes the reply when the work is done or the deadline passes.
`pause(abort)` ends requests through the same output path as a normal finish, on this thread,
before it replies.

One job past 400 lines: the handlers of every control op, on the core thread, over one state machine
(docs/architecture.md)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import torch

from tidal.engine import control_ops as ops
from tidal.engine.control_ops import DRAIN_DEFAULT_S, SLEEP_TAGS, OpResult, PauseMode, RequestSummary
from tidal.engine.messages import ControlCall, EngineError, EngineInvalidInput, EngineState
from tidal.engine.request import Request, RequestStatus
from tidal.engine.weights import WeightManager, stage, tensor_sha256  # noqa: F401 (tensor_sha256: re-exported)
from tidal.models.loader import FileStamp, checkpoint_fingerprint, fingerprint_change

if TYPE_CHECKING:
    from tidal.engine.core import EngineCore

# Fields a discarded-weights update (a full load from path) cannot take.
_NOT_WITH_DISCARDED = ("named_tensors", "group_name", "tensors", "buckets", "shm_path", "ipc_handles")
Handler = Callable[["ControlPlane", Any, Future], "OpResult | dict[str, Any] | None"]


@dataclass(slots=True)
class _Drain:
    replies: list[Future]
    deadline: float
    started: float
    inflight: list[Request]


@dataclass(slots=True)
class _SleepingWeights:
    cpu_copies: dict[str, torch.Tensor] | None  # None when discarded
    shapes: dict[str, torch.Size]
    bytes: int


def _summary(reqs: Iterable[Request]) -> list[RequestSummary]:
    return [RequestSummary(r.request_id, r.index, r.num_output_tokens) for r in reqs]


class ControlPlane:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.pause_mode: PauseMode | None = None
        self.sleeping: dict[str, Any] = {}  # tag -> what wake_up needs
        self.drain: _Drain | None = None
        self.last_op: dict[str, Any] | None = None
        self.op_counts: dict[str, int] = {}
        self.op_seconds: dict[str, float] = {}
        self.weights = WeightManager(core)

    # -- what the loop asks ---------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        return self.core.state

    def can_schedule(self) -> bool:
        return (
            self.state in (EngineState.SERVING, EngineState.DRAINING)
            and self.core.weights_loaded
            and self.weights.fenced is None
            and self.weights.writing is None
        )

    def can_admit(self) -> bool:
        return self.can_schedule()

    def holding(self) -> bool:
        return self.state is not EngineState.SERVING

    def rejecting(self) -> bool:
        return self.weights.fenced is not None or (self.holding() and self.core.config.reject_while_paused)

    def idle_timeout(self) -> float | None:
        if self.weights.refreshing():
            return 0.0  # KV refresh passes run between steps, and with no step to run too
        if self.drain is None:
            return None
        return max(0.0, self.drain.deadline - time.monotonic())

    def poll(self) -> None:
        """Run a KV refresh pass (a weight update staged on the CPU, kv_refresh.py) and reply
        to its update once done; complete a drain once its requests are done or its deadline
        has passed."""
        refreshed = self.weights.poll()
        if refreshed is not None:
            self._reply_job(*refreshed)
        d = self.drain
        if d is None:
            return
        done = not self.core.scheduler.has_work()
        if not done and time.monotonic() < d.deadline:
            return
        self.core.flush()
        leftover = [r for r in d.inflight if not r.finished] + self.core.find_requests(None)
        held = self.core.held_requests()
        leftover = [r for r in dict.fromkeys(leftover) if r not in held]
        self.core.end_requests(leftover, "abort")
        self.drain = None
        self.core.state = EngineState.PAUSED
        result = ops.PauseResult(
            mode="drain",
            state=self.state.value,
            finished=_summary(r for r in d.inflight if r.finish_reason != "abort"),
            aborted=_summary(leftover),
            elapsed_s=time.monotonic() - d.started,
        )
        self._record("pause", result, d.started)
        for reply in d.replies:
            if not reply.done():
                reply.set_result(result)

    def fail_pending(self, err: BaseException) -> None:
        if self.drain is not None:
            for reply in self.drain.replies:
                if not reply.done():
                    reply.set_exception(err)
            self.drain = None

    # -- dispatch ------------------------------------------------------------------------
    def handle(self, call: ControlCall) -> None:
        op, reply = call.op, call.reply or Future()
        handler = self.HANDLERS.get(type(op))
        if handler is None:
            reply.set_exception(EngineError(f"control op {op!r} is unknown: expected one of {sorted(ops.OPS_BY_NAME)}"))
            return
        t0 = time.monotonic()
        try:
            raw = handler(self, op, reply)
            result = None if raw is None else ops.as_result(op, raw)
        except Exception as e:  # the op failed; it has restored the state it changed
            self._record_error(op.name, e, t0)
            reply.set_exception(
                e if isinstance(e, EngineError) else EngineError(f"{op.name} failed: {type(e).__name__}: {e}")
            )
            return
        if result is None:  # the op completes `reply` later (drain, weight jobs)
            return
        if op.recorded:
            self._record(op.name, result, t0)
        elif op.counted:
            self._count(op.name, time.monotonic() - t0)
        if not reply.done():
            reply.set_result(result)

    def _record(self, op: str, result: OpResult, t0: float) -> None:
        elapsed = time.monotonic() - t0
        if result.elapsed_s is ops.UNSET:
            result.elapsed_s = elapsed
        self.last_op = {"op": op, "result": ops.result_dict(result), "at": time.time()}
        self._count(op, elapsed)

    def _record_error(self, op: str, err: BaseException, t0: float) -> None:
        self.last_op = {"op": op, "result": {"error": f"{type(err).__name__}: {err}"}, "at": time.time()}
        self._count(op, time.monotonic() - t0)

    def _count(self, op: str, elapsed: float) -> None:
        self.op_counts[op] = self.op_counts.get(op, 0) + 1
        self.op_seconds[op] = self.op_seconds.get(op, 0.0) + elapsed

    # -- pause / resume / abort ----------------------------------------------------------
    def pause(self, op: ops.Pause, reply: Future) -> ops.PauseResult | None:
        core, sched, mode = self.core, self.core.scheduler, op.mode
        t0 = time.monotonic()
        result = ops.PauseResult(mode=mode.value)
        if mode is PauseMode.DRAIN:
            if self.state is EngineState.SERVING or self.state is EngineState.DRAINING:
                if self.drain is None:
                    timeout = DRAIN_DEFAULT_S if op.timeout_s is None else float(op.timeout_s)
                    self.drain = _Drain([], t0 + timeout, t0, core.find_requests(None))
                    core.state = EngineState.DRAINING
                self.drain.replies.append(reply)
                self.poll()
                return None
            # already paused or asleep: nothing is running, nothing to drain
        elif mode is PauseMode.ABORT:
            victims = core.find_requests(None)
            core.end_requests(victims, "abort")
            result.aborted = _summary(victims)
        elif mode is PauseMode.RETRACT:
            queued = [r for r in sched.live_requests() if r.status is RequestStatus.WAITING]
            result.retracted = _summary(sched.retract_all())
            result.kept = _summary(queued)
        elif mode is PauseMode.KEEP:
            result.kept = _summary(sched.live_requests())
        if self.drain is not None:  # a harder pause overtakes a drain in progress
            d, self.drain = self.drain, None
            overtaken = ops.PauseResult(
                mode=result.mode,
                aborted=result.aborted,
                retracted=result.retracted,
                kept=result.kept,
                superseded_by=mode.value,
            )
            for r in d.replies:
                if not r.done():
                    r.set_result(overtaken)
        if self.state in (EngineState.SERVING, EngineState.DRAINING):
            core.state = EngineState.PAUSED
        self.pause_mode = mode
        result.state = self.state.value
        result.elapsed_s = time.monotonic() - t0
        return result

    def resume(self, op: ops.Resume, reply: Future) -> ops.ResumeResult:
        core = self.core
        if self.state is EngineState.SLEEPING:
            raise EngineError(f"resume: engine is sleeping ({sorted(self.sleeping)}); call wake_up first")
        if not core.weights_loaded:  # never serve placeholders (a discarded sleep not restored)
            raise EngineError(
                "resume: the weights are not loaded (discarded by sleep); "
                "wake_up(['weights']) or update_weights(path=...) first"
            )
        if self.state is EngineState.SERVING:
            return ops.ResumeResult(state="serving", changed=False)
        if self.drain is not None:
            d, self.drain = self.drain, None
            for r in d.replies:
                if not r.done():
                    r.set_result(ops.PauseResult(mode="drain", state="serving", superseded_by="resume"))
        core.state = EngineState.SERVING
        self.pause_mode = None
        return ops.ResumeResult(state="serving", changed=True, released_held=core.release_held())

    def abort(self, op: ops.Abort, reply: Future) -> ops.AbortResult:
        return ops.AbortResult(**self.core.abort(op.request_ids))

    # -- sleep / wake --------------------------------------------------------------------
    def sleep(self, op: ops.Sleep, reply: Future) -> ops.SleepResult:
        tags = list(SLEEP_TAGS) if op.tags is None else op.tags
        if self.state not in (EngineState.PAUSED, EngineState.SLEEPING):
            raise EngineError(f"sleep: engine is {self.state.value}; pause it first")
        if "weights" in tags and self.weights.writing is not None:
            raise EngineError(
                "sleep: an in-place weight update owns the parameters; commit_weights or "
                "abort_staged (or wait for it to finish) first"
            )
        runner = self.core.runner
        result = ops.SleepResult(tags=[], bytes_freed={}, retracted=[], state="", sleeping=[])
        for tag in tags:
            if tag in self.sleeping:
                continue
            before = _memory_in_use(runner)
            if tag == "kv_cache":
                self.weights.drop_refresh()
                # Kept requests cannot keep KV that is about to vanish: retract them.
                result.retracted = _summary(self.core.scheduler.retract_all())
                kv = runner.kv_cache
                nbytes = 0 if kv is None else kv.numel() * kv.element_size()
                # The last reference here, or the measurement below finds the cache still alive
                # (on CUDA it then reported 0 bytes freed: first run of the GPU handoff test).
                del kv
                runner.free_kv_cache()
                self.core.block_manager.reset()
                self.sleeping[tag] = nbytes
            else:
                if op.discard and self.core.weight_source is None:
                    raise EngineError(
                        "sleep(weights, discard=True): the weights came from in-memory "
                        "tensors and could not be restored; sleep without discard"
                    )
                self.sleeping[tag] = _offload_weights(runner, op.discard)
                self.core.weights_loaded = not op.discard
            result.bytes_freed[tag] = _freed(before, _memory_in_use(runner), self.sleeping[tag])
            result.tags.append(tag)
        # The staging arena of trainer broadcasts (CPU) is memory the engine holds too: give it back.
        self.weights.arena.release()
        self.core.state = EngineState.SLEEPING
        result.state = self.state.value
        result.sleeping = sorted(self.sleeping)
        return result

    def wake_up(self, op: ops.WakeUp, reply: Future) -> ops.WakeUpResult:
        tags = sorted(self.sleeping) if op.tags is None else op.tags
        runner = self.core.runner
        restored: dict[str, int] = {}
        # Weights first: their restore is the one that can fail on bad input. Each tag is
        # restored completely before it leaves `sleeping`; a failure leaves it asleep.
        for tag in sorted(set(tags) & set(self.sleeping), key=lambda t: t != "weights"):
            if tag == "kv_cache":
                runner.allocate_kv_cache()
            else:
                _restore_weights(self.core, self.sleeping[tag])
            restored[tag] = _nbytes(self.sleeping.pop(tag))
        if self.state is EngineState.SLEEPING and not self.sleeping:
            self.core.state = EngineState.PAUSED
        return ops.WakeUpResult(
            tags=sorted(restored), bytes_restored=restored, state=self.state.value, sleeping=sorted(self.sleeping)
        )

    # -- weights -------------------------------------------------------------------------
    def update_weights(self, op: ops.UpdateWeights, reply: Future) -> dict | None:
        asleep = self.sleeping.get("weights")
        if asleep is not None and asleep.cpu_copies is None and op.path is not None:
            # Discarded weights: nothing is serving, so the new checkpoint loads here, in full.
            if (
                op.source not in (None, "path")
                or not op.commit
                or op.staging != "copy"
                or any(getattr(op, f) is not None for f in _NOT_WITH_DISCARDED)
            ):
                raise EngineInvalidInput("source", op.source, "'path' (alone) while the weights are discarded")
            return self._update_discarded(op.path, None, op.version, op.checksums)
        kwargs = {f: getattr(op, f) for f in op.__struct_fields__}
        return self.weights.update(reply, **kwargs)  # None: the worker stages, weights_done replies

    def weights_done(self, op: ops.WeightsDone, reply: Future) -> None:
        done = self.weights.finish(op.job, op.outcome)
        if done is not None:  # None: not the job in progress, or its reply waits for a KV refresh
            self._reply_job(*done)

    def _reply_job(self, job: Any, outcome: dict | BaseException) -> None:
        if isinstance(outcome, BaseException):
            self._record_error(job.op, outcome, job.started)
            err = (
                outcome
                if isinstance(outcome, EngineError)
                else EngineError(f"{job.op} failed: {type(outcome).__name__}: {outcome}")
            )
            job.reply.set_exception(err)
            return
        try:
            result = msgspec.convert(outcome, ops.OPS_BY_NAME[job.op].result)
        except msgspec.ValidationError as e:
            self._record_error(job.op, e, job.started)
            job.reply.set_exception(EngineError(f"{job.op}: its result does not match its type: {e}"))
            return
        self._record(job.op, result, job.started)
        job.reply.set_result(result)

    def init_weight_transfer(self, op: ops.InitWeightTransfer, reply: Future) -> None:
        self.weights.init_transfer(
            reply,
            op.master_address,
            op.master_port,
            op.rank_offset,
            op.world_size,
            op.group_name,
            op.backend,
            op.timeout_s,
        )

    def destroy_weight_transfer(self, op: ops.DestroyWeightTransfer, reply: Future) -> dict:
        return self.weights.destroy_transfer(op.group_name)

    def check_weights(self, op: ops.CheckWeights, reply: Future) -> dict:
        from tidal.engine.weight_transfer import parse_specs

        return self.weights.check_specs(parse_specs(op.tensors))

    def commit_weights(self, op: ops.CommitWeights, reply: Future) -> dict:
        return self.weights.commit_staged(op.version)

    def abort_staged(self, op: ops.AbortStaged, reply: Future) -> dict:
        return self.weights.abort_staged()

    def fence(self, op: ops.Fence, reply: Future) -> dict:
        return self.weights.fence(str(op.reason)[:500])

    def _update_discarded(
        self,
        path: str | None = None,
        named_tensors: Iterable[tuple[str, torch.Tensor]] | dict | None = None,
        version: int | None = None,
        checksums: dict[str, str] | None = None,
    ) -> dict:
        core = self.core
        if (path is None) == (named_tensors is None):
            raise EngineError("update_weights: give exactly one of path= or named_tensors=")
        asleep = self.sleeping.get("weights")
        if asleep is not None and not (path is not None and asleep.cpu_copies is None):
            raise EngineError("update_weights: weights are asleep; wake_up(['weights']) first")
        if self.state is EngineState.DRAINING:
            raise EngineError("update_weights: a drain is in progress; wait for pause to return")
        if version is not None and version == core.weight_version and asleep is None:
            return {"weight_version": version, "skipped": True, "reason": "already at this version"}
        prev = core.state
        core.state = EngineState.UPDATING
        t0 = time.monotonic()
        root = core.config.weights_root
        try:
            stamp = checkpoint_fingerprint(path, root) if path is not None else None
            with _shaped_placeholders(core.runner, asleep):
                staged = stage(core.runner.model, path, named_tensors, checksums, root=root)
        except EngineError:
            raise
        except (ValueError, OSError) as e:  # a bad checkpoint is bad input, not a state conflict
            field = "path" if path is not None else "named_tensors"
            raise EngineInvalidInput(
                field, path, "a readable checkpoint matching the model", f"update_weights: {type(e).__name__}: {e}"
            ) from None
        finally:
            core.state = prev
        t1 = time.monotonic()
        model = core.runner.model
        if asleep is not None:  # discarded weights: the full checkpoint replaces them
            _load_into_fresh(core.runner, asleep.shapes, staged)
            del self.sleeping["weights"]
            core.weights_loaded = True
            if not self.sleeping:
                core.state = EngineState.PAUSED
        else:
            model.load_weights(staged.items())  # the commit: every tensor validated above
        if core.runner.device.type == "cuda":
            torch.cuda.synchronize(core.runner.device)
        core.weight_version = version if version is not None else core.weight_version + 1
        core.weight_source = path
        core.weight_fingerprint = stamp
        core.block_manager.reset_prefix_cache()
        return {
            "weight_version": core.weight_version,
            "num_tensors": len(staged),
            "bytes": sum(t.numel() * t.element_size() for t in staged.values()),
            "stage_s": t1 - t0,
            "commit_s": time.monotonic() - t1,
            "skipped": False,
        }

    def flush_cache(self, op: ops.FlushCache, reply: Future) -> ops.FlushCacheResult:
        self.core.block_manager.reset_prefix_cache()
        return ops.FlushCacheResult(flushed=True)

    def query_state(self, op: ops.State, reply: Future) -> ops.StateResult:
        return self.snapshot()

    def snapshot(self) -> ops.StateResult:
        core = self.core
        bm = core.block_manager
        runner = core.runner
        kv_bytes = 0 if runner.kv_cache is None else runner.kv_cache.numel() * runner.kv_cache.element_size()
        w_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        return ops.StateResult(
            state=core.state.value,
            pause_mode=self.pause_mode.value if self.pause_mode else None,
            weight_version=core.weight_version,
            num_running=len(core.scheduler.running),
            num_waiting=len(core.scheduler.waiting),
            num_held=len(core.held),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            memory_bytes={"kv_cache": kv_bytes, "weights": w_bytes},
            sleeping=sorted(self.sleeping),
            weights_loaded=core.weights_loaded,
            step_count=core.step_count,
            overlapped_steps=core.num_overlapped_steps,
            last_step_time_s=core.last_step_time,
            num_preemptions=core.scheduler.num_preemptions,
            prefix_cache_hit_tokens=bm.prefix_hits,
            prefix_cache_query_tokens=bm.prefix_queries,
            control_ops=dict(self.op_counts),
            control_op_seconds=dict(self.op_seconds),
            last_control_op=self.last_op,
            fenced=self.weights.fenced,
            weight_transfer=self.weights.snapshot(),
        )

    # One handler per message type, run on the core thread; a handler returns the op's result
    # (or a dict of its fields), or None when it completes `reply` later (drain, weight jobs).
    HANDLERS: ClassVar[dict[type[ops.ControlOp], Handler]] = {
        ops.Pause: pause,
        ops.Resume: resume,
        ops.Abort: abort,
        ops.Sleep: sleep,
        ops.WakeUp: wake_up,
        ops.UpdateWeights: update_weights,
        ops.InitWeightTransfer: init_weight_transfer,
        ops.DestroyWeightTransfer: destroy_weight_transfer,
        ops.CheckWeights: check_weights,
        ops.CommitWeights: commit_weights,
        ops.AbortStaged: abort_staged,
        ops.Fence: fence,
        ops.FlushCache: flush_cache,
        ops.State: query_state,
        ops.WeightsDone: weights_done,
    }


def _memory_in_use(runner) -> int | None:
    if runner.device.type != "cuda":
        return None
    torch.cuda.synchronize(runner.device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(runner.device)


def _freed(before: int | None, after: int | None, tensor_bytes: int | _SleepingWeights) -> int:
    """On CUDA, what the allocator gave back (measured); on CPU, the bytes of the freed tensors."""
    if before is not None and after is not None:
        return before - after
    return tensor_bytes.bytes if isinstance(tensor_bytes, _SleepingWeights) else tensor_bytes


def _offload_weights(runner, discard: bool) -> _SleepingWeights:
    copies: dict[str, torch.Tensor] | None = None if discard else {}
    nbytes = 0
    shapes = {}
    pin = runner.device.type == "cuda"
    for name, p in runner.model.named_parameters():
        nbytes += p.numel() * p.element_size()
        shapes[name] = p.shape
        if copies is not None:
            cpu = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
            cpu.copy_(p.data)
            copies[name] = cpu
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    runner.invalidate_graphs()
    return _SleepingWeights(copies, shapes, nbytes)


def _nbytes(saved: int | _SleepingWeights) -> int:
    return saved.bytes if isinstance(saved, _SleepingWeights) else saved


def _restore_weights(core: EngineCore, saved: _SleepingWeights) -> None:
    """Put the slept weights back, or raise with the parameters untouched (still placeholders)."""
    runner = core.runner
    params = dict(runner.model.named_parameters())
    if saved.cpu_copies is not None:
        moved = {name: cpu.to(runner.device, non_blocking=True) for name, cpu in saved.cpu_copies.items()}
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        for name, t in moved.items():
            params[name].data = t
        return
    _load_into_fresh(runner, saved.shapes, _reread_source(core))
    core.weights_loaded = True


def _reread_source(core: EngineCore) -> dict[str, torch.Tensor]:
    """The discarded weights, read again from their checkpoint, refused unless the files are the
    ones that were loaded (before and after the read: an overwrite mid-read is caught too)."""
    source, root = core.weight_source, core.config.weights_root
    if source is None:  # sleep(discard) refuses this; an engine that got here anyway has nothing to reread
        raise EngineError(
            "wake_up(weights): the weights came from no checkpoint (load_format='dummy') "
            "and no copy was kept: there is nothing to read them back from"
        )
    what = f"wake_up(weights): the checkpoint at {source!r}"
    try:
        _check_unchanged(core, what, checkpoint_fingerprint(source, root))
        with _shaped_placeholders(core.runner, core.control.sleeping.get("weights")):
            staged = stage(core.runner.model, source, None, None, root=root)
        _check_unchanged(core, what, checkpoint_fingerprint(source, root))
    except _SourceChanged as e:
        raise EngineError(str(e)) from None
    except Exception as e:  # a wake has no input of its own: the engine's source is the problem
        raise EngineError(f"{what} can no longer be loaded ({type(e).__name__}: {e}); {_STAY_ASLEEP}") from None
    return staged


_STAY_ASLEEP = "the weights stay asleep: update_weights(path=..., version=...) loads a new checkpoint in their place"


class _SourceChanged(Exception):
    pass


def _check_unchanged(core: EngineCore, what: str, now: dict[str, FileStamp]) -> None:
    change = fingerprint_change(core.weight_fingerprint or {}, now)
    if change is not None:
        raise _SourceChanged(
            f"{what} is not the one loaded as weight_version={core.weight_version}: {change}; {_STAY_ASLEEP}"
        )


@contextmanager
def _shaped_placeholders(runner, asleep: _SleepingWeights | None):
    """While weights are discarded their parameters are empty; checking a checkpoint against the
    model needs their shapes, so meanwhile give them one-element views expanded to those shapes."""
    if asleep is None or asleep.cpu_copies is not None:
        yield
        return
    params = dict(runner.model.named_parameters())
    placeholders = {name: p.data for name, p in params.items()}
    try:
        for name, p in params.items():
            p.data = torch.empty(1, dtype=p.dtype, device=p.device).expand(asleep.shapes[name])
        yield
    finally:
        for name, p in params.items():
            p.data = placeholders[name]


def _load_into_fresh(runner, shapes: dict[str, torch.Size], staged: dict[str, torch.Tensor]) -> None:
    """Give every placeholder parameter new storage filled from `staged`; on any failure the
    placeholders are put back, so a parameter is never left half-loaded."""
    params = dict(runner.model.named_parameters())
    placeholders = {name: p.data for name, p in params.items()}
    try:
        for name, p in params.items():
            p.data = torch.empty(shapes[name], dtype=p.dtype, device=runner.device)
        runner.model.load_weights(staged.items())
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
    except BaseException:
        for name, p in params.items():
            p.data = placeholders[name]
        raise
