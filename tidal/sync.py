"""The trainer side of weight transfer (DESIGN.md §8): push a model's tensors into Tidal replicas.

    with WeightSender(["http://127.0.0.1:8000", "http://127.0.0.1:8001"]) as sender:
        result = sender.push(model.state_dict(), version=step)

Needs torch and httpx only. A push is transactional across replicas: every replica first checks
the declared names, shapes and dtypes (nothing is broadcast to a replica that would refuse it),
then stages the tensors and holds them; only when every replica has staged does the sender ask
all of them to commit. Otherwise it aborts everywhere and every replica keeps its old version.
A replica that fails at commit is fenced (it refuses generation) rather than serve a version
its peers do not have.

Backends: "gloo" / "nccl" broadcast flattened buckets over a process group the sender creates
(rank 0; replica i joins at rank i+1). A contiguous tensor of at least `direct_bytes` is a bucket
of its own, broadcast straight from the trainer's memory (no copy); the small ones are packed
into two buffers kept across pushes, double-buffered: bucket k+1 is packed while k is on the
wire. The check round trip runs once per set of declared tensors: a later push of the same
names, shapes and dtypes goes straight to staging (a replica that would now refuse it still
consumes the broadcasts and answers with the error). With one replica the commit rides on the
staging call (there is no peer to wait for). "shm" writes one shared-memory file in /dev/shm
that colocated CPU replicas copy from; "ipc" sends CUDA IPC handles (as JSON) to colocated GPU
replicas.

One job past 400 lines: the sender's protocol (join, check, broadcast or stage, commit or roll back,
on every replica) is one state machine, and splitting its backends apart would repeat it per
backend."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from tidal.engine.weight_transfer import TransferGroup

BACKENDS = ("gloo", "nccl", "shm", "ipc")
_ALIGN = 256  # byte alignment of each tensor in a bucket (any dtype's item size divides it)


@dataclass
class PushResult:
    ok: bool
    version: int
    replicas: dict[str, dict] = field(default_factory=dict)  # url -> the replica's result or {"error": ...}
    phases: dict[str, float] = field(default_factory=dict)  # check, pack, wire, stage, commit, total (s)


@dataclass(slots=True)
class _Planned:
    name: str
    tensor: torch.Tensor
    offset: int
    nbytes: int
    direct: bool = False  # a bucket of its own, broadcast from the tensor's own memory


class ReplicaError(RuntimeError):
    pass


class WeightSender:
    def __init__(
        self,
        urls: list[str],
        backend: str = "gloo",
        bucket_bytes: int = 512 << 20,
        admin_key: str | None = None,
        timeout_s: float = 120.0,
        master_address: str = "127.0.0.1",
        master_port: int | None = None,
        group_name: str = "tidal-weights",
        staging: str = "copy",
        direct_bytes: int | None = 1 << 20,
    ) -> None:
        if not urls:
            raise ValueError("urls is empty: expected at least one replica URL")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is invalid: expected one of {list(BACKENDS)}")
        if staging not in ("copy", "in_place"):
            raise ValueError(
                f"staging={staging!r} is invalid: expected 'copy' or 'in_place' (no second copy of "
                "the weights on the engine; it holds generation while it writes)"
            )
        if bucket_bytes < _ALIGN:
            raise ValueError(f"bucket_bytes={bucket_bytes} is invalid: expected at least {_ALIGN}")
        if direct_bytes is not None and direct_bytes < 1:
            raise ValueError(
                f"direct_bytes={direct_bytes} is invalid: expected a positive byte count or None (pack every tensor)"
            )
        self.urls = [u.rstrip("/") for u in urls]
        self.backend, self.bucket_bytes, self.timeout_s, self.staging = backend, bucket_bytes, timeout_s, staging
        self.master_address, self.master_port, self.group_name = master_address, master_port, group_name
        self.direct_bytes = direct_bytes
        self._checked: list[dict] | None = None  # the specs every replica accepted in the last push
        self._bufs: list[torch.Tensor | None] = [None, None]  # pack buffers, kept across pushes
        self._headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._http = httpx.Client(timeout=timeout_s + 30.0, headers=self._headers)
        self._pool = ThreadPoolExecutor(max(2, len(urls) + 1), thread_name_prefix="tidal-sync")
        self._group: TransferGroup | None = None

    # -- HTTP -------------------------------------------------------------------------------
    def _post(self, url: str, path: str, body: dict | None = None) -> dict:
        r = self._http.post(url + path, json=body or {})
        if r.status_code != 200:
            try:
                msg = r.json()["error"]["message"]
            except Exception:
                msg = r.text[:500]
            raise ReplicaError(f"{path}: HTTP {r.status_code}: {msg}")
        return r.json()

    def _all(self, path: str, body_for, urls: list[str] | None = None) -> dict[str, dict | BaseException]:
        urls = self.urls if urls is None else urls
        futs = {u: self._pool.submit(self._post, u, path, body_for(i, u)) for i, u in enumerate(urls)}
        out: dict[str, dict | BaseException] = {}
        for u, f in futs.items():
            try:
                out[u] = f.result()
            except BaseException as e:
                out[u] = e
        return out

    # -- the group ------------------------------------------------------------------------
    def _connect(self) -> None:
        from tidal.engine.weight_transfer import join_group

        port = self.master_port or _free_port(self.master_address)
        world = len(self.urls) + 1

        def body(i: int) -> dict[str, Any]:
            return {
                "master_address": self.master_address,
                "master_port": port,
                "rank_offset": i + 1,
                "world_size": world,
                "group_name": self.group_name,
                "backend": self.backend,
                "timeout_s": self.timeout_s,
            }

        futs = {
            u: self._pool.submit(self._post, u, "/v1/init_weight_transfer", body(i)) for i, u in enumerate(self.urls)
        }
        try:
            group = join_group(self.master_address, port, 0, world, self.group_name, self.backend, self.timeout_s)
        except BaseException:
            for f in futs.values():
                f.cancel()
            raise
        errors = {}
        for u, f in futs.items():
            try:
                f.result()
            except BaseException as e:
                errors[u] = e
        self._group = group
        if errors:
            self._disconnect()
            raise ReplicaError(f"init_weight_transfer failed on {errors}")

    def _disconnect(self) -> None:
        if self._group is None:
            return
        from tidal.engine.weight_transfer import destroy_group

        self._all("/v1/destroy_weight_transfer", lambda i, u: {"group_name": self.group_name})
        destroy_group(self._group)
        self._group = None

    # -- push -----------------------------------------------------------------------------
    def push(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor], version: int
    ) -> PushResult:
        t0 = time.perf_counter()
        items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        items = [(n, t.detach()) for n, t in items]
        phases = {"check": 0.0, "pack": 0.0, "wire": 0.0, "stage": 0.0, "commit": 0.0}
        result = PushResult(False, version, phases=phases)
        specs = [{"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for n, t in items]
        if specs != self._checked:
            self._checked = None
            tk = time.perf_counter()
            checked = self._all("/v1/check_weights", lambda i, u: {"tensors": specs})
            phases["check"] = time.perf_counter() - tk
            if self._failed(result, checked, "check"):
                return self._done(result, t0)
        direct = self.direct_bytes if self.backend in ("gloo", "nccl") else None
        buckets = _plan(items, self.bucket_bytes, direct, self._wire_device(items))
        commit_now = len(self.urls) == 1
        staged = self._stage(buckets, version, phases, commit_now)
        if self._failed(result, staged, "stage"):
            self._checked = None
            ok_urls = [u for u, r in staged.items() if isinstance(r, dict)]
            if not commit_now:
                self._all("/v1/abort_staged", lambda i, u: {}, ok_urls)
            if self.backend in ("gloo", "nccl"):
                self._drop_group()
            return self._done(result, t0)
        self._checked = specs
        if commit_now:  # the replica committed at the end of staging
            reply = staged[self.urls[0]]
            phases["commit"] = reply.get("commit_s", 0.0)
            phases["stage"] = max(0.0, phases["stage"] - phases["commit"])
            result.replicas, result.ok = dict(staged), True
            return self._done(result, t0)
        tc = time.perf_counter()
        committed = self._all("/v1/commit_weights", lambda i, u: {"version": version})
        phases["commit"] = time.perf_counter() - tc
        bad = [u for u, r in committed.items() if isinstance(r, BaseException)]
        if bad:
            self._checked = None
        for u in bad:  # its peers serve `version` now: it must not keep serving the old one
            try:
                self._post(u, "/v1/fence", {"reason": f"commit of version {version} failed"})
            except Exception:
                pass
        result.replicas = {u: _as_dict(r) for u, r in committed.items()}
        result.ok = not bad
        return self._done(result, t0)

    def _failed(self, result: PushResult, replies: dict[str, Any], phase: str) -> bool:
        if all(isinstance(r, dict) for r in replies.values()):
            return False
        result.replicas = {u: _as_dict(r, phase) for u, r in replies.items()}
        return True

    def _done(self, result: PushResult, t0: float) -> PushResult:
        result.phases["total"] = time.perf_counter() - t0
        return result

    def _drop_group(self) -> None:
        try:
            self._disconnect()
        except Exception:
            self._group = None

    def _wire_device(self, items: list[tuple[str, torch.Tensor]]) -> torch.device:
        return items[0][1].device if self.backend == "nccl" and items else torch.device("cpu")

    def _stage(self, buckets: list[list[_Planned]], version: int, phases: dict, commit: bool) -> dict[str, Any]:
        if self.backend in ("gloo", "nccl"):
            return self._stage_broadcast(buckets, version, phases, commit)
        if self.backend == "shm":
            return self._stage_shm(buckets, version, phases, commit)
        return self._stage_ipc(buckets, version, phases, commit)

    def _stage_broadcast(
        self, buckets: list[list[_Planned]], version: int, phases: dict, commit: bool
    ) -> dict[str, Any]:
        if self._group is None:
            self._connect()
        meta = [{"nbytes": _bucket_bytes(b), "tensors": [_meta(p) for p in b]} for b in buckets]
        body = {
            "group_name": self.group_name,
            "layout": "bucketed",
            "buckets": meta,
            "version": version,
            "commit": commit,
            "timeout_s": self.timeout_s,
            "staging": self.staging,
        }
        futs = {u: self._pool.submit(self._post, u, "/v1/update_weights_from_distributed", body) for u in self.urls}
        try:
            self._broadcast(buckets, phases)
            wire_error = None
        except BaseException as e:  # a replica died mid-broadcast, or the deadline passed
            wire_error = e
        ts = time.perf_counter()
        out: dict[str, Any] = {}
        for u, f in futs.items():
            try:
                out[u] = f.result()
            except BaseException as e:
                out[u] = e
        phases["stage"] = time.perf_counter() - ts
        if wire_error is not None and not commit:  # a replica that committed has every byte
            out = {
                u: r if isinstance(r, BaseException) else ReplicaError(f"broadcast failed: {wire_error}")
                for u, r in out.items()
            }
        return out

    def _broadcast(self, buckets: list[list[_Planned]], phases: dict) -> None:
        """Every broadcast is queued without waiting; a packed bucket waits only for the broadcast
        that last read its buffer, so bucket k+1 is packed while bucket k is on the wire."""
        device = buckets[0][0].tensor.device if self.backend == "nccl" else torch.device("cpu")
        group = self._group
        if group is None:
            raise ReplicaError("no weight-transfer group: call init_weight_transfer first")
        pending: list[Any] = []
        readers: list[Any] = [None, None]  # the broadcast reading each pack buffer
        slot = 0
        for bucket in buckets:
            if bucket[0].direct:
                pending.append(dist.broadcast(_as_bytes(bucket[0].tensor), src=0, group=group.pg, async_op=True))
                continue
            tw = time.perf_counter()
            if readers[slot] is not None:
                readers[slot].wait()
            tp = time.perf_counter()
            phases["wire"] += tp - tw
            buf = self._buffer(slot, _bucket_bytes(bucket), device)
            _pack(bucket, buf)
            phases["pack"] += time.perf_counter() - tp
            readers[slot] = dist.broadcast(buf, src=0, group=group.pg, async_op=True)
            pending.append(readers[slot])
            slot ^= 1
        tw = time.perf_counter()
        for work in pending:
            work.wait()
        phases["wire"] += time.perf_counter() - tw

    def _buffer(self, slot: int, n: int, device: torch.device) -> torch.Tensor:
        """A view of n bytes of pack buffer `slot`; kept across pushes (a fresh allocation is
        first touched page by page, which costs more than the packing itself)."""
        buf = self._bufs[slot]
        if buf is None or buf.numel() < n or buf.device != device:
            buf = self._bufs[slot] = torch.empty(max(n, self.bucket_bytes), dtype=torch.uint8, device=device)
        return buf[:n]

    def _stage_shm(self, buckets: list[list[_Planned]], version: int, phases: dict, commit: bool) -> dict[str, Any]:
        flat = [p for b in buckets for p in b]
        offset, placed = 0, []
        for p in flat:  # one segment: every tensor at its own aligned offset
            placed.append(_Planned(p.name, p.tensor, offset, p.nbytes))
            offset = _align(offset + p.nbytes)
        path = os.path.join("/dev/shm", f"tidal-weights-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        tp = time.perf_counter()
        try:
            seg = torch.from_file(path, shared=True, size=max(offset, 1), dtype=torch.uint8)
            _pack(placed, seg)
            del seg
            phases["pack"] += time.perf_counter() - tp
            body = {
                "shm_path": path,
                "tensors": [_meta(p) for p in placed],
                "version": version,
                "commit": commit,
                "timeout_s": self.timeout_s,
                "staging": self.staging,
            }
            ts = time.perf_counter()
            out = self._all("/v1/update_weights_from_shm", lambda i, u: body)
            phases["stage"] = time.perf_counter() - ts
        finally:
            if os.path.exists(path):
                os.unlink(path)
        return out

    def _stage_ipc(self, buckets: list[list[_Planned]], version: int, phases: dict, commit: bool) -> dict[str, Any]:
        from tidal.engine.weight_transfer import encode_ipc_handle

        flat = [p for b in buckets for p in b]
        tp = time.perf_counter()
        tensors = _pack_views([p.tensor for p in flat])  # kept alive until every replica has copied
        handles = [encode_ipc_handle(t) for t in tensors]
        torch.cuda.synchronize()
        phases["pack"] += time.perf_counter() - tp
        body = {
            "tensors": [{"name": p.name, "dtype": _dtype_name(p.tensor), "shape": list(p.tensor.shape)} for p in flat],
            "ipc_handles": handles,
            "version": version,
            "commit": commit,
            "timeout_s": self.timeout_s,
            "staging": self.staging,
        }
        ts = time.perf_counter()
        out = self._all("/v1/update_weights_from_ipc", lambda i, u: body)
        phases["stage"] = time.perf_counter() - ts
        del tensors
        return out

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self._drop_group()
        finally:
            self._pool.shutdown(wait=False)
            self._http.close()
            self._bufs = [None, None]

    def __enter__(self) -> WeightSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- packing ------------------------------------------------------------------------------------
def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _meta(p: _Planned) -> dict:
    return {"name": p.name, "dtype": _dtype_name(p.tensor), "shape": list(p.tensor.shape), "offset": p.offset}


def _plan(
    items: list[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    direct_bytes: int | None = None,
    device: torch.device | None = None,
) -> list[list[_Planned]]:
    """Greedy buckets of at most bucket_bytes (a larger tensor gets a bucket of its own). A
    contiguous tensor of at least direct_bytes already on the wire's device is a bucket of its
    own that is broadcast without a copy."""
    buckets: list[list[_Planned]] = [[]]
    direct: list[list[_Planned]] = []
    used = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        if direct_bytes is not None and n >= direct_bytes and t.is_contiguous() and t.device == device:
            direct.append([_Planned(name, t, 0, n, direct=True)])
            continue
        if buckets[-1] and used + n > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append(_Planned(name, t, used, n))
        used = _align(used + n)
    # packed first: the first pack then runs before anything is on the wire (packing while gloo's
    # threads send starves it of the cores); later packs overlap the broadcasts before them
    return [b for b in buckets if b] + direct


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _bucket_bytes(bucket: list[_Planned]) -> int:
    last = bucket[-1]
    return max(last.offset + last.nbytes, 1)


def _total(buckets: list[list[_Planned]]) -> int:
    return max(_bucket_bytes(b) for b in buckets)


def _pack(bucket: list[_Planned], buf: torch.Tensor) -> None:
    for p in bucket:
        if p.nbytes:
            buf[p.offset : p.offset + p.nbytes].copy_(p.tensor.contiguous().reshape(-1).view(torch.uint8))


def _as_dict(r: Any, phase: str | None = None) -> dict:
    if isinstance(r, BaseException):
        return {"error": f"{type(r).__name__}: {r}", **({"phase": phase} if phase else {})}
    return r


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pack_views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` as views into one new CUDA buffer (each at a 256-byte offset).

    Every IPC handle then names the same allocation, which the engine opens once (torch caches
    opened storages by handle) instead of once per allocation the trainer's tensors came from;
    the cost is one device copy of the pushed bytes, held until the replicas have copied them."""
    if not tensors:
        return []
    offsets, size = [], 0
    for t in tensors:
        size = -(-size // 256) * 256
        offsets.append(size)
        size += t.numel() * t.element_size()
    buf = torch.empty(size, dtype=torch.uint8, device=tensors[0].device)
    views = []
    for t, off in zip(tensors, offsets):
        v = buf[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        v.copy_(t)
        views.append(v)
    return views
