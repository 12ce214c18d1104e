"""Weight updates (DESIGN.md §5, §8): validate, stage, commit — with generation running meanwhile.

The core thread owns this object's state. Reading tensors (a checkpoint directory, a trainer's
broadcasts, a shared-memory segment) is slow, so it runs on one worker thread owned by this
module; the worker touches no engine state and hands its result back as an inbox message
(`weights_done`), which the core thread applies between two steps. So a commit is one message:
on the CPU point the parameters at the buffers the worker cast the tensors into (weight_swap.py),
on CUDA copy them into the live parameters (same storage, so captured CUDA graphs stay valid),
bump the version, invalidate the prefix cache, and send running requests back to
recompute their KV under the new weights (their tokens are kept). Requests running across it
record a new weight span, since every token carries the version live when it was resolved.

A failure anywhere before the commit leaves the old weights and the engine state as they were,
tears a trainer group down (it may be out of step), and is reported by state(). `commit=False`
stages and holds the tensors until commit_weights(version) or abort_staged(), which is how a
trainer makes an update transactional across replicas. A commit that fails part-way fences the
engine: it refuses generation until a later update commits, rather than serve mixed weights.

One job past 400 lines: one weight-update transaction (validate, stage or write in place, commit,
roll back) from every source."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tidal.engine import weight_transfer as wt
from tidal.engine.control_ops import WeightsDone
from tidal.engine.kv_refresh import KvRefresh
from tidal.engine.messages import ControlCall, EngineError, EngineInvalidInput, EngineState
from tidal.engine.weight_swap import SwapStage

if TYPE_CHECKING:
    from tidal.engine.core import EngineCore

log = logging.getLogger("tidal.engine")

SOURCES = ("path", "tensors", "distributed", "shm", "ipc")
STAGING = ("copy", "in_place")
DEFAULT_TIMEOUT_S = 600.0


@dataclass(slots=True)
class _Job:
    """Work running on the worker thread; `done` runs on the core thread with its result."""

    op: str
    reply: Future
    started: float
    done: Callable[[Any, _Job], dict | None]  # None: the reply waits for a KV refresh
    failed: Callable[[BaseException], None] | None = None
    deadline: float = math.inf


@dataclass(slots=True)
class _Staged:
    version: int
    tensors: dict[str, torch.Tensor]
    source: str | None
    stage_s: float
    fingerprint: Any = None  # loader.checkpoint_fingerprint of a path source, kept at commit
    in_place: _InPlace | None = None  # staging="in_place": already written, `tensors` is empty
    swap: SwapStage | None = None  # CPU: cast into parameter-shaped buffers; `tensors` is the rest


_Received = tuple[dict[str, torch.Tensor], SwapStage | None]  # what the commit copies, what it swaps


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (contiguous, on the CPU)."""
    data = t.detach().contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _count(held: _Staged) -> int:
    if held.in_place is not None:
        return len(held.in_place.names)
    return len(held.tensors) + (0 if held.swap is None else len(held.swap.names))


def _held_bytes(held: _Staged) -> int:
    if held.in_place is not None:
        return held.in_place.bytes
    return _nbytes(held.tensors) + (0 if held.swap is None else held.swap.bytes)


class _InPlace:
    """staging="in_place", for when a second copy of the weights does not fit: each arriving
    tensor is written straight into the live parameters, after a host copy is kept of the
    region it overwrites, so a failure or abort_staged() puts the old weights back exactly.
    Generation is held while a writer is active (WeightManager.writing gates scheduling)."""

    def __init__(self, model, checksums: dict[str, str] | None, field: str | None) -> None:
        self.model, self.checksums = model, checksums or {}
        self.field = field  # bad input is EngineInvalidInput naming it; None: a failed transfer
        self.backup: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.names: set[str] = set()
        self.bytes = 0
        self.restore_error: str | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            self.model.check_weight(name, tensor)
        except ValueError as e:
            raise self._error(str(e)) from None
        if name in self.names:
            raise self._error(f"tensor {name!r} appears twice in the source")
        digest = self.checksums.get(name)
        actual = None if digest is None else tensor_sha256(tensor)
        if actual != digest:
            raise self._error(f"checksum of {name!r} is {actual}, expected {digest}")
        self.names.add(name)
        dst = self.model.live_view(name)
        if dst is None:  # a buffer the model recomputes (rotary tables)
            return
        self.backup.append((dst, dst.detach().to("cpu", copy=True)))
        dst.copy_(tensor)
        self.bytes += tensor.numel() * tensor.element_size()

    def _error(self, msg: str) -> EngineError:
        msg = f"update_weights: {msg}"
        return (
            EngineError(msg)
            if self.field is None
            else EngineInvalidInput(self.field, None, "tensors matching the model", msg)
        )

    def restore(self) -> None:
        """Put back every overwritten region (reverse order: tied weights share storage)."""
        try:
            with torch.no_grad():
                for dst, old in reversed(self.backup):
                    dst.copy_(old)
            if self.backup and self.backup[0][0].is_cuda:
                torch.cuda.synchronize(self.backup[0][0].device)
        except BaseException as e:
            self.restore_error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.backup = []


class WeightManager:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.group: wt.TransferGroup | None = None
        self.job: _Job | None = None
        self.staged: _Staged | None = None
        self.fenced: str | None = None
        self.last_failure: dict[str, Any] | None = None
        self.writing: _InPlace | None = None  # an in-place update owns the live parameters
        self.arena = wt.StagingArena()  # copy staging from a trainer group lands here
        # Running requests' KV recomputed under staged weights before the commit (kv_refresh.py),
        # and the update whose reply waits for it to catch up.
        self.refresh: KvRefresh | None = None
        self.pending: tuple[_Staged, bool, _Job] | None = None

    # -- what the control plane asks ------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        g = self.group
        return {
            "group": None
            if g is None
            else {"name": g.name, "backend": g.backend, "rank": g.rank, "world_size": g.world_size},
            "busy": None if self.job is None else self.job.op,
            "staged_version": None if self.staged is None else self.staged.version,
            "writing_in_place": self.writing is not None,
            "fenced": self.fenced,
            "last_failure": self.last_failure,
            "kv_refresh": None if self.refresh is None else self.refresh.summary(),
        }

    def _start(
        self,
        op: str,
        reply: Future,
        work: Callable[[], Any],
        done: Callable[[Any, _Job], dict | None],
        failed: Callable[[BaseException], None] | None = None,
        deadline: float = math.inf,
    ) -> None:
        if self.job is not None:
            raise EngineError(f"{op}: {self.job.op} is still in progress; one weight operation at a time")
        job = _Job(op, reply, time.monotonic(), done, failed, deadline)
        self.job = job
        fut: Future = Future()
        fut.add_done_callback(lambda f: self.core.submit(ControlCall(WeightsDone(job=job, outcome=f))))
        # A daemon thread: one stuck in a collective must not hold the process at exit.
        threading.Thread(target=_run, args=(work, fut), name="tidal-weights", daemon=True).start()

    def finish(self, job: object, result: Future | None) -> tuple[_Job, dict | BaseException] | None:
        """Core thread: the worker finished `job`; apply or clean up. Returns what to reply."""
        mine = self.job
        if mine is None or job is not mine or result is None:  # not ours (or forged over the wire): nothing to do
            return None
        self.job = None
        job = mine
        try:
            outcome = job.done(result.result(), job)
        except BaseException as e:
            return job, self._failed(job, e)
        if outcome is None:  # staged; the reply waits for the KV refresh (poll)
            self.job = job
            return None
        return job, outcome

    def _failed(self, job: _Job, e: BaseException) -> BaseException:
        if job.failed is not None:
            job.failed(e)
        self.last_failure = {"op": job.op, "error": f"{type(e).__name__}: {e}", "at": time.time()}
        return e

    def poll(self) -> tuple[_Job, dict | BaseException] | None:
        """Core thread, between steps: one KV refresh pass. Returns the waiting update's reply
        once its refresh has caught up (or given up)."""
        refresh = self.refresh
        if refresh is None:
            return None
        try:
            over = refresh.tick()
        except Exception as e:  # the refresh is an optimisation: never let it take the engine down
            log.exception("KV refresh failed; running requests recompute at the commit")
            refresh.drop(f"{type(e).__name__}: {e}")
            over = True
        if not over or self.pending is None:
            return None
        held, commit, job = self.pending
        self.pending = None
        self.job = None
        try:
            return job, self._commit(held) if commit else self._hold(held)
        except BaseException as e:
            return job, self._failed(job, e)

    def refreshing(self) -> bool:
        """A reply waits for the KV refresh: the loop must keep polling even with nothing to run."""
        return self.pending is not None

    def drop_refresh(self) -> None:
        """The KV pool is about to be released: the shadows' blocks go with it."""
        if self.refresh is not None:
            self.refresh.drop("the KV cache was released")

    def _end_refresh(self) -> None:
        """The staged update is dropped (or the engine closes): its shadows go with it."""
        if self.refresh is not None:
            self.refresh.drop()
            self.refresh = None

    # -- process group --------------------------------------------------------------------
    def init_transfer(
        self,
        reply: Future,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str = "gloo",
        timeout_s: float | None = None,
    ) -> None:
        if backend not in wt.BACKENDS:
            raise EngineInvalidInput("backend", backend, f"one of {list(wt.BACKENDS)}")
        if backend == "nccl" and self.core.runner.device.type != "cuda":
            raise EngineInvalidInput("backend", backend, "'gloo' on an engine without a CUDA device")
        if not isinstance(master_port, int) or not 0 < master_port < 65536:
            raise EngineInvalidInput("master_port", master_port, "a TCP port in 1..65535")
        if not isinstance(world_size, int) or world_size < 2:
            raise EngineInvalidInput("world_size", world_size, "at least 2 (the trainer and this engine)")
        if not isinstance(rank_offset, int) or not 1 <= rank_offset < world_size:
            raise EngineInvalidInput(
                "rank_offset", rank_offset, f"a rank in 1..{world_size - 1} (rank 0 is the trainer)"
            )
        if not isinstance(group_name, str) or not group_name:
            raise EngineInvalidInput("group_name", group_name, "a non-empty group name")
        if self.group is not None:  # re-init replaces the old group: the trainer made a new one
            wt.destroy_group(self.group)
            self.group = None
        timeout = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)

        def done(group: wt.TransferGroup, job: _Job) -> dict:
            self.group = group
            return {
                "group_name": group.name,
                "rank": group.rank,
                "world_size": group.world_size,
                "backend": group.backend,
            }

        self._start(
            "init_weight_transfer",
            reply,
            lambda: wt.join_group(master_address, master_port, rank_offset, world_size, group_name, backend, timeout),
            done,
        )

    def destroy_transfer(self, group_name: str | None = None) -> dict:
        g = self.group
        if g is None or (group_name is not None and group_name != g.name):
            return {"destroyed": False, "group_name": group_name}
        if self.job is not None:
            raise EngineError(f"destroy_weight_transfer: {self.job.op} is using the group; it ends at its deadline")
        wt.destroy_group(g)
        self.group = None
        return {"destroyed": True, "group_name": g.name}

    def _teardown(self) -> None:
        if self.group is not None:
            wt.destroy_group(self.group)
            self.group = None

    # -- validation ----------------------------------------------------------------------
    def check_specs(self, specs: list[wt.TensorSpec]) -> dict:
        """Every declared name, shape and dtype against the model; raises naming the first bad one."""
        model = self.core.runner.model
        seen: set[str] = set()
        for s in specs:
            if s.name in seen:  # in two buckets: the second would silently replace the first
                raise EngineInvalidInput(f"tensors[{s.name!r}]", s.name, "each tensor name at most once")
            seen.add(s.name)
            if not s.dtype.is_floating_point:
                raise EngineInvalidInput(f"tensors[{s.name!r}].dtype", str(s.dtype), "a floating-point dtype")
            try:
                model.check_weight_spec(s.name, s.shape, s.dtype)
            except ValueError as e:
                raise EngineInvalidInput(f"tensors[{s.name!r}]", list(s.shape), str(e)) from None
        return {"ok": True, "num_tensors": len(specs), "bytes": sum(s.nbytes for s in specs)}

    def _precheck(self, op: str) -> None:
        if "weights" in self.core.control.sleeping:
            raise EngineError(f"{op}: weights are asleep; wake_up(['weights']) first")
        if self.core.state is EngineState.DRAINING:
            raise EngineError(f"{op}: a drain is in progress; wait for pause to return")
        if self.staged is not None:
            raise EngineError(f"{op}: version {self.staged.version} is staged; commit_weights or abort_staged first")

    # -- update --------------------------------------------------------------------------
    def update(
        self,
        reply: Future,
        source: str | None = None,
        path: str | None = None,
        named_tensors: Iterable[tuple[str, torch.Tensor]] | dict | None = None,
        version: int | None = None,
        checksums: dict[str, str] | None = None,
        group_name: str | None = None,
        tensors: list | None = None,
        layout: str = "per_tensor",
        buckets: list | None = None,
        shm_path: str | None = None,
        ipc_handles: list | None = None,
        commit: bool = True,
        staging: str = "copy",
        timeout_s: float | None = None,
        flush_cache: bool = True,
    ) -> dict | None:
        source = source or ("path" if path is not None else "tensors" if named_tensors is not None else None)
        if source not in SOURCES:
            raise EngineInvalidInput("source", source, f"one of {list(SOURCES)}")
        if (
            (path is not None) + (named_tensors is not None) > 1
            or (source == "path") != (path is not None)
            or (source == "tensors") != (named_tensors is not None)
        ):
            raise EngineError("update_weights: give exactly one of path= or named_tensors=, matching source=")
        if staging not in STAGING:
            raise EngineInvalidInput("staging", staging, f"one of {list(STAGING)}")
        if version is not None and (not isinstance(version, int) or version < 0):
            raise EngineInvalidInput("version", version, "a non-negative integer")
        deadline = time.monotonic() + (DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s))
        if source in ("distributed", "shm", "ipc"):
            self._update_declared(
                reply,
                source,
                version,
                checksums,
                group_name,
                tensors,
                layout,
                buckets,
                shm_path,
                ipc_handles,
                commit,
                deadline,
                staging,
            )
            return None
        self._precheck("update_weights")
        core = self.core
        if version is not None and version == core.weight_version and self.fenced is None:
            return {"weight_version": version, "skipped": True, "reason": "already at this version"}
        model, device = core.runner.model, core.runner.device

        root = core.config.weights_root
        if staging == "in_place":
            field = "path" if path is not None else "named_tensors"

            def items() -> Iterable[tuple[str, torch.Tensor]]:
                yield from iter_source(model, path, named_tensors, deadline, root)

            def complete(writer: _InPlace) -> Any:
                if path is None:
                    return None
                from tidal.models.loader import checkpoint_fingerprint

                _check_complete(model, path, writer.names)
                return checkpoint_fingerprint(path, root)

            self._write_in_place(reply, items, checksums, field, version, path, commit, complete)
            return None

        def work() -> tuple[_Received, Any]:
            from tidal.models.loader import checkpoint_fingerprint

            stamp = checkpoint_fingerprint(path, root) if path is not None else None
            staged = stage(model, path, named_tensors, checksums, deadline, root=root)
            if device.type == "cuda":
                return ({n: t.to(device) for n, t in staged.items()}, None), stamp
            return self._swap_staged(lambda sink: staged, None), stamp

        def done(result: tuple[_Received, Any], job: _Job) -> dict | None:
            (staged, swap), stamp = result
            return self._staged(staged, version, path, commit, job, fingerprint=stamp, swap=swap)

        self._start("update_weights", reply, work, done, deadline=deadline)
        return None

    def _update_declared(
        self,
        reply: Future,
        source: str,
        version: int | None,
        checksums: dict | None,
        group_name: str | None,
        tensors: list | None,
        layout: str,
        buckets: list | None,
        shm_path: str | None,
        ipc_handles: list | None,
        commit: bool,
        deadline: float,
        staging: str = "copy",
    ) -> None:
        device = self.core.runner.device
        if layout not in wt.LAYOUTS:
            raise EngineInvalidInput("layout", layout, f"one of {list(wt.LAYOUTS)}")
        if source == "distributed":
            g = self.group
            if g is None or (group_name is not None and group_name != g.name):
                raise EngineInvalidInput(
                    "group_name",
                    group_name,
                    f"the name of a group joined with init_weight_transfer (now: {None if g is None else g.name!r})",
                )
            group = g  # narrowed: the closures below see a TransferGroup
            parsed = wt.parse_buckets(buckets) if layout == "bucketed" else None
            specs = [s for b in parsed for s in b.tensors] if parsed else wt.parse_specs(tensors)
        else:
            specs = wt.parse_specs(tensors, with_offsets=source == "shm")
            parsed = None
        try:
            self._precheck("update_weights")
            self.check_specs(specs)
            _check_checksum_names(checksums, specs)
        except EngineError as e:
            if source != "distributed":
                raise
            rejected = e  # `e` itself is cleared when this block ends

            # Rejected before anything is applied: still take part in the declared broadcasts,
            # so a trainer that did not wait for our answer is not left blocked in a collective.
            def discard() -> None:
                wt.discard_declared(group, specs, parsed, deadline)
                raise rejected

            self._start("update_weights", reply, discard, lambda _, job: {}, lambda e: self._teardown())
            return None
        torn = (lambda e: self._teardown()) if source == "distributed" else None
        if staging == "in_place":
            if source == "distributed":
                items = (
                    (lambda: wt.iter_buckets(group, parsed, device, deadline))
                    if parsed
                    else (lambda: wt.iter_per_tensor(group, specs, device, deadline))
                )
            elif source == "shm":
                shm = wt.check_shm_path(shm_path)
                items = lambda: wt.iter_shm(shm, specs)  # noqa: E731
            else:
                items = lambda: wt.iter_ipc(ipc_handles, specs, device)  # noqa: E731
            self._write_in_place(reply, items, checksums, None, version, None, commit, lambda w: None, torn)
            return None
        recv: Callable[[wt.Sink | None], dict[str, torch.Tensor]]
        if source == "distributed":
            recv = (
                (lambda sink: wt.receive_buckets(group, parsed, device, deadline, self.arena, sink))
                if parsed
                else (lambda sink: wt.receive_per_tensor(group, specs, device, deadline, self.arena, sink))
            )
        elif source == "shm":
            path = wt.check_shm_path(shm_path)
            recv = lambda sink: wt.receive_shm(path, specs, device)  # noqa: E731
        else:
            recv = lambda sink: wt.receive_ipc(ipc_handles, specs, device)  # noqa: E731

        def work() -> _Received:
            if device.type == "cuda":
                staged = recv(None)
                _verify(staged, checksums)
                return staged, None
            return self._swap_staged(recv, checksums)

        def done(result: _Received, job: _Job) -> dict | None:
            return self._staged(result[0], version, None, commit, job, swap=result[1])

        self._start("update_weights", reply, work, done, torn, deadline)
        return None

    def _swap_staged(
        self, recv: Callable[[wt.Sink | None], dict[str, torch.Tensor]], checksums: dict[str, str] | None
    ) -> _Received:
        """Worker, CPU: receive (or read) the tensors and cast each, as it arrives, into a buffer
        shaped like its parameter (weight_swap.py). Returns what the commit must still copy (the
        parameters a swap would be wrong for) and the SwapStage."""
        swap = SwapStage(self.core.runner.model, self.arena.spare)
        rest: dict[str, torch.Tensor] = {}
        seen: set[str] = set()

        def sink(name: str, t: torch.Tensor) -> None:
            seen.add(name)
            if not swap.put(name, t):
                rest[name] = t

        try:
            staged = recv(sink)
            _verify(staged, checksums)
            for name, t in staged.items():  # from a source that takes no sink
                if name not in seen:
                    sink(name, t)
            swap.finish()
        except BaseException:
            swap.give_back()
            raise
        return rest, swap

    def _write_in_place(
        self,
        reply: Future,
        items: Callable[[], Iterable[tuple[str, torch.Tensor]]],
        checksums: dict[str, str] | None,
        field: str | None,
        version: int | None,
        source: str | None,
        commit: bool,
        complete: Callable[[_InPlace], Any],
        torn: Callable[[BaseException], None] | None = None,
    ) -> None:
        """The worker writes into the live parameters; nothing is scheduled until it commits,
        or until a failure (or abort_staged) has put the old weights back."""
        writer = _InPlace(self.core.runner.model, checksums, field)
        device = self.core.runner.device

        def work() -> Any:
            try:
                with torch.no_grad():
                    for name, t in items():
                        writer.write(name, t)
                stamp = complete(writer)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return stamp
            except BaseException:
                writer.restore()  # raises (and sets restore_error) if it cannot
                raise

        def failed(e: BaseException) -> None:
            self.writing = None
            if writer.restore_error is not None:
                self.fenced = (
                    f"in-place update failed and the old weights could not be restored: {writer.restore_error}"
                )
            if torn is not None:
                torn(e)

        self.writing = writer
        self._start(
            "update_weights",
            reply,
            work,
            lambda stamp, job: self._staged({}, version, source, commit, job, stamp, writer),
            failed,
        )

    def _staged(
        self,
        staged: dict[str, torch.Tensor],
        version: int | None,
        source: str | None,
        commit: bool,
        job: _Job,
        fingerprint: Any = None,
        in_place: _InPlace | None = None,
        swap: SwapStage | None = None,
    ) -> dict | None:
        """Core thread: the worker staged every tensor. Commit now, or hold for commit_weights
        (an in-place update holds generation meanwhile: the live parameters are already new).
        None: running requests first get their KV under the new weights (kv_refresh.py); the
        reply waits for that (poll)."""
        stage_s = time.monotonic() - job.started
        version = self.core.weight_version + 1 if version is None else version
        held = _Staged(version, staged, source, stage_s, fingerprint, in_place, swap)
        core = self.core
        if (
            swap is not None
            and swap.buffers
            and not staged  # every new value is in the buffers the passes point the parameters at
            and in_place is None
            and core.config.kv_refresh
            and core.scheduler.running
            and core.runner.kv_cache is not None
        ):
            self.refresh = KvRefresh(core, swap, job.deadline)
            self.pending = (held, commit, job)
            return None
        return self._commit(held) if commit else self._hold(held)

    def _hold(self, held: _Staged) -> dict:
        self.staged = held
        return {
            "staged": True,
            "weight_version": self.core.weight_version,
            "staged_version": held.version,
            "num_tensors": _count(held),
            "bytes": _held_bytes(held),
            "stage_s": held.stage_s,
            "staging": "copy" if held.in_place is None else "in_place",
        }

    def _commit(self, held: _Staged) -> dict:
        refresh, self.refresh = self.refresh, None
        try:
            return self._commit_with(held, refresh)
        finally:
            if refresh is not None:
                refresh.drop()  # what switch() did not hand over (all of it on a failure)

    def _commit_with(self, held: _Staged, refresh: KvRefresh | None) -> dict:
        core = self.core
        if "weights" in core.control.sleeping:  # slept while staging: nothing to copy into
            raise EngineError(
                f"update_weights: weights went to sleep before version {held.version} "
                "could commit; wake_up(['weights']) and update again"
            )
        t0 = time.monotonic()
        try:
            # copy_ into the live parameters what was not staged for a swap (an in-place update
            # has written them already), then point the rest at their staged buffers
            core.runner.model.load_weights(held.tensors.items())
            if held.swap is not None:
                held.swap.swap()
            if core.runner.device.type == "cuda":
                torch.cuda.synchronize(core.runner.device)
        except BaseException as e:  # part of the weights may be new: never serve them mixed
            self.fenced = f"commit of version {held.version} failed part-way: {type(e).__name__}: {e}"
            raise EngineError(f"update_weights: {self.fenced}; the engine is fenced until an update commits") from None
        core.weight_version = held.version
        core.weight_source = held.source
        core.weight_fingerprint = held.fingerprint
        core.runner.weights_updated()
        # Running requests' KV came from the old weights: each takes the KV its refresh computed
        # under the new ones, or recomputes it (keeping its tokens), so what they generate from
        # here on is exactly the new weights' continuation.
        refreshed = set() if refresh is None else refresh.switch()
        recomputed = core.scheduler.retract([r for r in core.scheduler.running if r not in refreshed])
        core.block_manager.reset_prefix_cache()
        self.fenced = None
        self.writing = None  # the in-place backup is dropped with `held`
        return {
            "weight_version": held.version,
            "num_tensors": _count(held),
            "bytes": _held_bytes(held),
            "stage_s": held.stage_s,
            "commit_s": time.monotonic() - t0,
            "skipped": False,
            "committed": True,
            "recomputed": len(recomputed),
            "refreshed": len(refreshed),
            **({} if refresh is None else {"kv_refresh": refresh.summary()}),
            "staging": "copy" if held.in_place is None else "in_place",
        }

    def commit_staged(self, version: int | None = None) -> dict:
        held = self.staged
        if held is None:
            if version is not None and version == self.core.weight_version and self.fenced is None:
                return {"weight_version": version, "skipped": True, "reason": "already committed"}
            raise EngineError("commit_weights: nothing is staged")
        if version is not None and version != held.version:
            raise EngineInvalidInput("version", version, f"the staged version {held.version}")
        self.staged = None
        return self._commit(held)

    def abort_staged(self) -> dict:
        held, self.staged = self.staged, None
        self._end_refresh()
        if held is not None and held.swap is not None:
            held.swap.give_back()
        if held is not None and held.in_place is not None:
            self.writing = None
            try:
                held.in_place.restore()
            except BaseException as e:
                self.fenced = f"abort_staged could not restore the weights an in-place update overwrote: {e}"
                raise EngineError(
                    f"abort_staged: {self.fenced}; the engine is fenced until an update commits"
                ) from None
        return {
            "aborted": held is not None,
            "staged_version": None if held is None else held.version,
            "weight_version": self.core.weight_version,
        }

    def fence(self, reason: str) -> dict:
        self.fenced = f"fenced by the caller: {reason}"
        return {"fenced": self.fenced}

    def close(self) -> None:
        self._end_refresh()
        self.arena.release()
        if self.group is not None:
            wt.destroy_group(self.group)
            self.group = None


def _run(work: Callable[[], Any], fut: Future) -> None:
    try:
        fut.set_result(work())
    except BaseException as e:
        fut.set_exception(e)


def _check_checksum_names(checksums: dict | None, specs: list[wt.TensorSpec]) -> None:
    if checksums is None:
        return
    if not isinstance(checksums, dict):
        raise EngineInvalidInput("checksums", type(checksums).__name__, "an object {name: sha256 hex}")
    names = {s.name for s in specs}
    for name in checksums:
        if name not in names:
            raise EngineInvalidInput("checksums", name, "names of declared tensors")


def _verify(staged: dict[str, torch.Tensor], checksums: dict[str, str] | None, invalid_input: bool = False) -> None:
    """A checkpoint's wrong checksum is bad input (400); a trainer's wrong bytes fail the update."""
    for name, digest in (checksums or {}).items():
        if name not in staged:
            msg = f"update_weights: checksum given for {name!r}, which the source lacks"
            raise (
                EngineInvalidInput("checksums", name, "names of tensors in the source", msg)
                if invalid_input
                else EngineError(msg)
            )
        actual = tensor_sha256(staged[name])
        if actual != digest:
            msg = f"update_weights: checksum of {name!r} is {actual}, expected {digest}"
            raise EngineInvalidInput("checksums", name, digest, msg) if invalid_input else EngineError(msg)


def iter_source(
    model, path: str | None, named_tensors, deadline: float = float("inf"), root: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of a checkpoint directory (or of `named_tensors`), checked against the model
    as it is read, without touching the model. Raises on any problem: bad input
    (EngineInvalidInput naming `path` or `named_tensors`) or a failing source. The loader
    confines every file to `root` and refuses non-regular ones (a FIFO named *.safetensors would
    block the reader forever)."""
    from tidal.models.loader import iter_checkpoint

    field = "path" if path is not None else "named_tensors"
    seen: set[str] = set()
    try:
        source = (
            iter_checkpoint(path, root)
            if path is not None
            else (named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        )
        for name, tensor in source:
            if time.monotonic() > deadline:
                raise EngineError("update_weights: the call's deadline passed while reading the tensors")
            try:
                model.check_weight(name, tensor)
            except ValueError as e:
                raise EngineInvalidInput(field, path, "tensors matching the model", f"update_weights: {e}") from None
            if name in seen:
                raise EngineInvalidInput(
                    field, path, "each tensor once", f"update_weights: tensor {name!r} appears twice in the source"
                )
            seen.add(name)
            yield name, tensor
    except (EngineError, EngineInvalidInput):
        raise
    except (ValueError, OSError) as e:  # a bad checkpoint is bad input, not a state conflict
        raise EngineInvalidInput(
            field, path, "a readable checkpoint matching the model", f"update_weights: {type(e).__name__}: {e}"
        ) from None


def _check_complete(model, path: str, names: Iterable[str]) -> None:
    missing = sorted(set(model.weight_specs()) - set(names) - model.optional_weights())
    if missing:
        raise EngineInvalidInput(
            "path",
            path,
            "every tensor of the model",
            f"update_weights: {path} is missing {len(missing)} tensors: {missing[:8]}",
        )


def stage(
    model,
    path: str | None,
    named_tensors,
    checksums: dict[str, str] | None,
    deadline: float = float("inf"),
    root: str | None = None,
) -> dict[str, torch.Tensor]:
    """Read and validate every tensor (iter_source) into a staging copy, without touching the model."""
    staged = dict(iter_source(model, path, named_tensors, deadline, root))
    if path is not None:
        _check_complete(model, path, staged)
    _verify(staged, checksums, invalid_input=True)
    return staged
