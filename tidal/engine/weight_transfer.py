"""Receiving weights from a trainer process (DESIGN.md §8): joining its process group, and the
wire formats (per tensor, flattened buckets, a shared-memory segment, CUDA IPC handles).

Everything here runs on the weights worker thread (tidal/engine/weights.py), never on the core
thread, and touches no engine state: it returns received tensors or raises.

The group is created the way SGLang, slime, OpenRLHF and AReaL create theirs, so their trainer
code joins it unchanged: a `tcp://` rendezvous whose store is wrapped in a PrefixStore named after
the group, then a *named* group that is not the default group (the trainer has its own).

One job past 400 lines: every wire format a trainer can send (per tensor, buckets, shared memory,
CUDA IPC), each with its receiver and its checks."""

from __future__ import annotations

import base64
import mmap
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tidal.engine.messages import EngineError, EngineInvalidInput

BACKENDS = ("gloo", "nccl")
LAYOUTS = ("per_tensor", "bucketed")
SHM_DIR = "/dev/shm"
_POLL_S = 0.05  # how often the NCCL watchdog looks at a pending broadcast
_WINDOW = 4  # receives posted ahead, so the next one is ready when the trainer sends
_ALIGN = 256  # byte alignment of each received tensor in the staging arena


@dataclass(slots=True)
class TensorSpec:
    """One declared tensor: its checkpoint (HF) name, dtype and shape, and where it lies in its
    bucket or segment (offset in bytes; 0 for per-tensor broadcasts)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * _itemsize(self.dtype)


@dataclass(slots=True)
class Bucket:
    nbytes: int
    tensors: list[TensorSpec]


@dataclass(slots=True)
class TransferGroup:
    name: str
    backend: str
    rank: int
    world_size: int
    timeout_s: float
    pg: Any


# -- parsing what the caller declared ------------------------------------------------------
def parse_dtype(value: object, field: str) -> torch.dtype:
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise EngineInvalidInput(field, value, "a torch dtype name such as 'bfloat16' or 'float32'")
    return dtype


def parse_specs(items: object, field: str = "tensors", with_offsets: bool = False) -> list[TensorSpec]:
    if not isinstance(items, list) or not items:
        raise EngineInvalidInput(field, items, "a non-empty list of {name, dtype, shape}")
    specs = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise EngineInvalidInput(where, item, "an object {name, dtype, shape}")
        name, shape = item.get("name"), item.get("shape")
        if not isinstance(name, str) or not name:
            raise EngineInvalidInput(f"{where}.name", name, "a tensor name")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and 0 <= d < 2**40 for d in shape):
            raise EngineInvalidInput(f"{where}.shape", shape, "a list of non-negative integers")
        offset = item.get("offset", 0)
        if with_offsets and (not isinstance(offset, int) or offset < 0):
            raise EngineInvalidInput(f"{where}.offset", offset, "a non-negative byte offset")
        dtype = parse_dtype(item.get("dtype"), f"{where}.dtype")
        if with_offsets and offset % _itemsize(dtype):
            raise EngineInvalidInput(f"{where}.offset", offset, f"a multiple of {dtype}'s item size")
        specs.append(TensorSpec(name, dtype, tuple(shape), offset if with_offsets else 0))
    seen: set[str] = set()
    dup: set[str] = set()
    for s in specs:  # linear: this runs on the core thread, and MoE checkpoints have ~10^4 names
        if s.name in seen:
            dup.add(s.name)
        seen.add(s.name)
    if dup:
        raise EngineInvalidInput(field, sorted(dup), "each tensor name at most once")
    return specs


def parse_buckets(items: object) -> list[Bucket]:
    if not isinstance(items, list) or not items:
        raise EngineInvalidInput("buckets", items, "a non-empty list of {nbytes, tensors}")
    buckets = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("nbytes"), int) or item["nbytes"] <= 0:
            raise EngineInvalidInput(
                f"buckets[{i}].nbytes",
                None if not isinstance(item, dict) else item.get("nbytes"),
                "a positive byte count",
            )
        specs = parse_specs(item.get("tensors"), f"buckets[{i}].tensors", with_offsets=True)
        check_extent(specs, item["nbytes"], f"buckets[{i}]")
        buckets.append(Bucket(item["nbytes"], specs))
    return buckets


def check_extent(specs: list[TensorSpec], nbytes: int, field: str) -> None:
    for s in specs:
        if s.offset + s.nbytes > nbytes:
            raise EngineInvalidInput(
                f"{field}.tensors[{s.name!r}]",
                s.offset + s.nbytes,
                f"a tensor ending within the {nbytes} bytes declared",
            )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -- the group -------------------------------------------------------------------------------
def join_group(
    master_address: str, master_port: int, rank: int, world_size: int, group_name: str, backend: str, timeout_s: float
) -> TransferGroup:
    """Rendezvous at tcp://master_address:master_port as `rank` and build the named group. Blocks
    until every rank has arrived or `timeout_s` passes."""
    from torch.distributed.distributed_c10d import (
        Backend,
        GroupName,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    host = f"[{master_address}]" if ":" in master_address else master_address
    store, rank, world_size = next(rendezvous(f"tcp://{host}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    # The prefix keeps our keys apart from anything else using the trainer's store; the trainer
    # side (SGLang's init_custom_process_group and its copies) uses the same one.
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=GroupName(group_name),
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}  # group rank == rank in the group
    return TransferGroup(group_name, backend, rank, world_size, timeout_s, pg)


def destroy_group(group: TransferGroup) -> None:
    if group.backend == "nccl":
        _abort_nccl(group)
    try:
        dist.destroy_process_group(group.pg)
    except Exception:  # already gone with its peer; nothing else holds it
        pass


def _abort_nccl(group: TransferGroup) -> None:
    try:
        group.pg._get_backend(torch.device("cuda")).abort()
    except Exception:
        pass


def _post(group: TransferGroup, t: torch.Tensor, deadline: float) -> Any:
    if deadline - time.monotonic() <= 0:
        raise EngineError("update_weights: the call's deadline passed before the transfer finished")
    return dist.broadcast(t, src=0, group=group.pg, async_op=True)


def _wait(group: TransferGroup, work: Any, deadline: float) -> None:
    """Wait for a posted receive, or raise once `deadline` (monotonic) has passed."""
    if group.backend == "gloo":
        try:
            work.wait(timeout=timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
        except RuntimeError as e:
            raise EngineError(f"update_weights: broadcast from the trainer failed: {e}") from None
        return
    # NCCL: wait() would only order streams; watch the work and abort the communicator at the
    # deadline, so a dead trainer cannot hold us for NCCL's own (minutes-long) timeout.
    while not work.is_completed():
        if time.monotonic() > deadline:
            _abort_nccl(group)
            raise EngineError(
                "update_weights: broadcast did not finish by the call's deadline; the communicator was aborted"
            )
        time.sleep(_POLL_S)
    work.wait()


def _broadcast(group: TransferGroup, t: torch.Tensor, deadline: float) -> None:
    """Receive `t` from rank 0 of the group, or raise once `deadline` (monotonic) has passed."""
    _wait(group, _post(group, t, deadline), deadline)


Sink = Callable[[str, torch.Tensor], None]  # takes each received tensor while later ones are on the wire


def _receive_all(
    group: TransferGroup,
    tensors: list[torch.Tensor],
    deadline: float,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Receive each tensor in order, keeping up to _WINDOW receives posted ahead; ready(i) runs
    once tensor i has arrived, in order."""
    pending: deque = deque()
    done = 0

    def wait_one() -> None:
        nonlocal done
        _wait(group, pending.popleft(), deadline)
        if ready is not None:
            ready(done)
        done += 1

    for t in tensors:
        if len(pending) == _WINDOW:
            wait_one()
        pending.append(_post(group, t, deadline))
    while pending:
        wait_one()


class StagingArena:
    """One flat host buffer that staged transfers are received into, kept between updates: on
    the CPU a fresh allocation is first touched page by page, which costs about as much as the
    transfer itself. (On a GPU the caching allocator already reuses memory: no arena there.)
    `spare`: the parameter storage the last swap commits replaced (weight_swap.py), which the
    next update casts into."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.spare: dict[torch.nn.Parameter, torch.Tensor] = {}

    def views(self, sizes: list[int], device: torch.device) -> list[torch.Tensor]:
        if device.type != "cpu":
            return [torch.empty(n, dtype=torch.uint8, device=device) for n in sizes]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total = (total + n + _ALIGN - 1) // _ALIGN * _ALIGN
        if self.buf is None or self.buf.numel() < total:
            self.buf = None  # the old one goes before the new one is allocated
            self.buf = torch.empty(max(total, 1), dtype=torch.uint8)
        return [self.buf[o : o + n] for o, n in zip(offsets, sizes)]

    def release(self) -> None:
        self.buf = None
        self.spare.clear()


def _wire_device(group: TransferGroup, device: torch.device) -> torch.device:
    return device if group.backend == "nccl" else torch.device("cpu")


def iter_per_tensor(
    group: TransferGroup, specs: list[TensorSpec], device: torch.device, deadline: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each declared tensor broadcast on its own, in the declared order (SGLang's protocol);
    yields each as it arrives, on the wire's device."""
    wire = _wire_device(group, device)
    for s in specs:
        t = torch.empty(s.shape, dtype=s.dtype, device=wire)
        _broadcast(group, t, deadline)
        yield s.name, t


def iter_buckets(
    group: TransferGroup, buckets: list[Bucket], device: torch.device, deadline: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """One uint8 broadcast per bucket; yields its tensors as views into it at their offsets."""
    wire = _wire_device(group, device)
    for b in buckets:
        buf = torch.empty(b.nbytes, dtype=torch.uint8, device=wire)
        _broadcast(group, buf, deadline)
        buf = buf.to(device)
        for s in b.tensors:
            yield s.name, buf[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)


def receive_per_tensor(
    group: TransferGroup,
    specs: list[TensorSpec],
    device: torch.device,
    deadline: float,
    arena: StagingArena | None = None,
    sink: Sink | None = None,
) -> dict[str, torch.Tensor]:
    arena = arena or StagingArena()
    raw = arena.views([s.nbytes for s in specs], _wire_device(group, device))
    tensors = [r.view(s.dtype).view(s.shape) for r, s in zip(raw, specs)]
    ready = None if sink is None else (lambda i: sink(specs[i].name, tensors[i].to(device)))
    _receive_guarded(group, tensors, deadline, arena, ready)
    return {s.name: t.to(device) for s, t in zip(specs, tensors)}


def receive_buckets(
    group: TransferGroup,
    buckets: list[Bucket],
    device: torch.device,
    deadline: float,
    arena: StagingArena | None = None,
    sink: Sink | None = None,
) -> dict[str, torch.Tensor]:
    """Every bucket received straight into the staging arena; its tensors are views into it.
    `sink` gets each bucket's tensors as soon as that bucket has arrived."""
    arena = arena or StagingArena()
    bufs = arena.views([b.nbytes for b in buckets], _wire_device(group, device))

    def tensors_of(i: int) -> Iterator[tuple[str, torch.Tensor]]:
        buf = bufs[i].to(device)
        for s in buckets[i].tensors:
            yield s.name, buf[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)

    def ready(i: int) -> None:
        if sink is not None:
            for name, t in tensors_of(i):
                sink(name, t)

    _receive_guarded(group, bufs, deadline, arena, ready)
    return {n: t for i in range(len(buckets)) for n, t in tensors_of(i)}


def _receive_guarded(
    group: TransferGroup,
    tensors: list[torch.Tensor],
    deadline: float,
    arena: StagingArena,
    ready: Callable[[int], None] | None = None,
) -> None:
    try:
        _receive_all(group, tensors, deadline, ready)
    except BaseException:
        arena.release()  # a receive still posted may write into it: the next update gets a fresh one
        raise


def discard_declared(
    group: TransferGroup, specs: list[TensorSpec], buckets: list[Bucket] | None, deadline: float
) -> None:
    """Take part in every declared broadcast and drop the bytes, so a trainer that broadcasts
    without waiting for our answer is not left blocked when we reject its update."""
    if buckets is None:
        for s in specs:
            _broadcast(group, torch.empty(s.shape, dtype=s.dtype), deadline)
        return
    for b in buckets:
        _broadcast(group, torch.empty(b.nbytes, dtype=torch.uint8), deadline)


# -- colocated: shared memory (CPU) ------------------------------------------------------------
def check_shm_path(path: object) -> str:
    if not isinstance(path, str) or os.path.dirname(path) != SHM_DIR or "\x00" in path:
        raise EngineInvalidInput("shm_path", path, f"a file directly under {SHM_DIR}")
    try:
        st = os.lstat(path)
    except OSError as e:
        raise EngineInvalidInput("shm_path", path, f"an existing file ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise EngineInvalidInput("shm_path", path, "a regular file (not a link, FIFO or device)")
    return path


def iter_shm(path: str, specs: list[TensorSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    """The declared tensors of a shared-memory file the trainer wrote (metadata came as JSON;
    the file holds raw bytes only), as views into one host copy of it."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise EngineInvalidInput("shm_path", path, "a regular file")
        size = os.fstat(fd).st_size
        check_extent(specs, size, "shm")
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
            raw = torch.frombuffer(bytearray(mm), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
    finally:
        os.close(fd)
    for s in specs:
        yield s.name, raw[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)


def receive_shm(path: str, specs: list[TensorSpec], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: t.to(device) for name, t in iter_shm(path, specs)}


# -- colocated: CUDA IPC (GPU) ------------------------------------------------------------------
# A CUDA tensor shared by torch.multiprocessing.reductions.reduce_tensor is rebuilt from these
# fields; the trainer sends them as JSON (bytes as base64), so no body is ever unpickled.
IPC_FIELDS = (
    "size",
    "stride",
    "offset",
    "dtype",
    "device",
    "handle",
    "storage_size_bytes",
    "storage_offset_bytes",
    "ref_counter_handle",
    "ref_counter_offset",
    "event_handle",
    "event_sync_required",
)


def _b64(handle: dict, key: str) -> bytes | None:
    return base64.b64decode(handle[key]) if handle[key] is not None else None


def iter_ipc(handles: object, specs: list[TensorSpec], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The trainer's CUDA tensors themselves, opened from their IPC handles (no copy)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if device.type != "cuda":
        raise EngineInvalidInput("source", "ipc", "an engine on a CUDA device (use shm on the CPU)")
    if not isinstance(handles, list) or len(handles) != len(specs):
        raise EngineInvalidInput("ipc_handles", type(handles).__name__, f"a list of {len(specs)} handle objects")
    for i, (h, s) in enumerate(zip(handles, specs)):
        if not isinstance(h, dict) or sorted(h) != sorted(IPC_FIELDS):
            raise EngineInvalidInput(
                f"ipc_handles[{i}]",
                sorted(h) if isinstance(h, dict) else h,
                f"an object with the fields {list(IPC_FIELDS)}",
            )
        if tuple(h["size"]) != s.shape or parse_dtype(h["dtype"], f"ipc_handles[{i}].dtype") != s.dtype:
            raise EngineInvalidInput(f"ipc_handles[{i}]", (h["size"], h["dtype"]), f"shape {list(s.shape)}, {s.dtype}")
        yield (
            s.name,
            rebuild_cuda_tensor(
                torch.Tensor,
                torch.Size(h["size"]),
                tuple(h["stride"]),
                int(h["offset"]),
                torch.storage.UntypedStorage,
                s.dtype,
                int(h["device"]),
                _b64(h, "handle"),
                int(h["storage_size_bytes"]),
                int(h["storage_offset_bytes"]),
                False,
                _b64(h, "ref_counter_handle"),
                int(h["ref_counter_offset"]),
                _b64(h, "event_handle"),
                bool(h["event_sync_required"]),
            ),
        )


def receive_ipc(handles: object, specs: list[TensorSpec], device: torch.device) -> dict[str, torch.Tensor]:
    # our own copies: the trainer may free its buffers once we answer
    out = {name: t.to(device, copy=True) for name, t in iter_ipc(handles, specs, device)}
    torch.cuda.synchronize(device)
    return out


def encode_ipc_handle(t: torch.Tensor) -> dict[str, Any]:
    """The trainer side of receive_ipc: a CUDA tensor's sharing handle as JSON-able fields."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(t)
    (
        _,
        size,
        stride,
        offset,
        _,
        dtype,
        dev,
        handle,
        storage_size,
        storage_offset,
        _,
        ref_handle,
        ref_offset,
        event_handle,
        event_sync,
    ) = args
    b64 = lambda v: None if v is None else base64.b64encode(v).decode()  # noqa: E731
    return {
        "size": list(size),
        "stride": list(stride),
        "offset": offset,
        "dtype": str(dtype).removeprefix("torch."),
        "device": dev,
        "handle": b64(handle),
        "storage_size_bytes": storage_size,
        "storage_offset_bytes": storage_offset,
        "ref_counter_handle": b64(ref_handle),
        "ref_counter_offset": ref_offset,
        "event_handle": b64(event_handle),
        "event_sync_required": event_sync,
    }
