"""ReplicaController: one pipeline's generation cluster as real `tidal serve` replicas behind its router.

A replica rank lives on a device slot (`ClusterSpec.replica(rank)`). On a GPU host the replica's
process is pinned to those GPUs with CUDA_VISIBLE_DEVICES; on CPU a slot is only a label, and the
code path is the same.

shrink(ranks): drain each replica through the router (its requests continue on the pipeline's
other replicas; with none left they end with finish_reason="abort" and their partial tokens), take
it out of the router, then sleep it (`kv_cache` + `weights`) or stop its process, and verify the
memory was released before returning; a release that cannot be verified raises
`ReleaseUnverified`, and the scheduler then never hands those slots on.

expand(ranks): wake (or start) the replicas on the granted slots, bring them to the pipeline's
current weight version by a selective push of the pipeline's host-memory copy (tidal.sync's
WeightSender over just those URLs, shared memory on one host), check each serves that version,
then add them to the router.

Every phase is timed (`records`): drain, release, verify; wake or start, sync, join.

One job past 400 lines: shrink and expand are each a sequence (drain, sleep or stop, verify; start
or wake, sync, join) whose steps share the replica bookkeeping kept here."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch

from tidal.cluster.types import ClusterSpec, ControllerError, ReleaseUnverified

RELEASE_MODES = ("sleep", "stop")


@dataclass(slots=True)
class HostWeights:
    """The pipeline's latest weights in host memory; version 0 with no tensors is the base checkpoint."""

    version: int = 0
    tensors: dict[str, torch.Tensor] | None = None

    def set(self, state: dict[str, torch.Tensor], version: int) -> None:
        if version <= self.version:
            raise ValueError(f"version={version}: expected a version above the current {self.version}")
        self.tensors = {n: t.detach().to("cpu", copy=True) for n, t in state.items()}
        self.version = version


@dataclass(slots=True)
class ControllerConfig:
    model: str
    device: str = "cpu"  # "cpu", or "cuda": slot ids are GPU indices
    release: str = "sleep"  # sleep the replica, or stop its process
    serve_args: tuple[str, ...] = ()
    admin_key: str | None = None
    start_timeout_s: float = 300.0
    call_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0
    # A release verifies when the measured drop is >= fraction * expected - slack bytes.
    min_release_fraction: float = 0.9
    release_slack_bytes: int = 4 << 20
    log_dir: str | None = None

    def __post_init__(self) -> None:
        if self.release not in RELEASE_MODES:
            raise ValueError(f"release={self.release!r}: expected one of {list(RELEASE_MODES)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: expected 'cpu' or 'cuda'")
        if not 0 < self.min_release_fraction:
            raise ValueError(f"min_release_fraction={self.min_release_fraction!r}: expected a positive number")


@dataclass(slots=True)
class Replica:
    rank: int
    slot: tuple[int, ...]
    url: str
    proc: subprocess.Popen
    engine_pid: int
    log_path: str
    asleep: bool = False

    def alive(self) -> bool:
        return self.proc.poll() is None and pid_alive(self.engine_pid)


@dataclass(slots=True)
class Record:
    """One shrink or expand of one replica: what happened and how long each phase took (seconds)."""

    op: str
    rank: int
    slot: tuple[int, ...]
    start: float  # seconds since the controller was created
    phases: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)


class ReplicaController:
    """The GenerationController of one pipeline (see the module docstring)."""

    def __init__(
        self,
        pipeline_id: str,
        spec: ClusterSpec,
        router_url: str,
        config: ControllerConfig,
        weights: HostWeights | None = None,
    ) -> None:
        self.pipeline_id, self.spec, self.config = pipeline_id, spec, config
        self.router_url = router_url.rstrip("/")
        self.weights = weights if weights is not None else HostWeights()
        self.replicas: dict[int, Replica] = {}
        self.serving: set[int] = set()
        self.records: list[Record] = []
        self.changed = asyncio.Event()  # set after every shrink/expand: waiters re-check `serving`
        self.t0 = time.monotonic()
        headers = {"Authorization": f"Bearer {config.admin_key}"} if config.admin_key else {}
        self.http = httpx.AsyncClient(timeout=config.call_timeout_s, headers=headers)
        self.log_dir = config.log_dir or tempfile.mkdtemp(prefix=f"tidal-{pipeline_id}-")
        self._lock = asyncio.Lock()  # weight pushes vs shrink/expand
        self.closed = False

    # ---- GenerationController ------------------------------------------------------------------

    async def shrink(self, ranks: list[int]) -> None:
        async with self._lock:
            recs = {r: Record("shrink", r, self.spec.replica(r), self._now()) for r in ranks}
            for r in ranks:  # one at a time: each drain's requests land on live peers
                await self._drain(r, recs[r])
            await asyncio.gather(*(self._release(r, recs[r]) for r in ranks))
            self.records += recs.values()
            self._changed()

    async def expand(self, ranks: list[int]) -> None:
        async with self._lock:
            if self.closed:
                raise ControllerError(f"pipeline {self.pipeline_id!r}: expand({ranks}) after close()")
            recs = {r: Record("expand", r, self.spec.replica(r), self._now()) for r in ranks}
            await asyncio.gather(*(self._bring_up(r, recs[r]) for r in ranks))
            await self._sync(ranks, recs)
            for r in ranks:
                await self._join(r, recs[r])
            self.records += recs.values()
            self._changed()

    async def prestart(self, ranks: list[int]) -> None:
        """Start these replicas now and put them to sleep at once, out of the router, so a later
        expand only wakes them. For CPU slots, or a pool no pipeline is using yet: a starting
        replica briefly holds its weights and KV cache on its slot."""
        async with self._lock:
            recs = {r: Record("prestart", r, self.spec.replica(r), self._now()) for r in ranks}
            await asyncio.gather(*(self._prestart(r, recs[r]) for r in ranks if r not in self.replicas))
            self.records += recs.values()

    async def _prestart(self, rank: int, rec: Record) -> None:
        t = time.monotonic()
        self.replicas[rank] = await self._start(rank)
        rec.phases["start"] = time.monotonic() - t
        await self._sleep(self.replicas[rank], rec)

    # ---- weights -------------------------------------------------------------------------------

    async def push(self, state: dict[str, torch.Tensor], version: int) -> dict[str, Any]:
        """The trainer's new weights: kept in host memory, pushed to the replicas serving now.
        Replicas that are asleep or not started get them at their next expand."""
        async with self._lock:
            self.weights.set(state, version)
            live = sorted(self.serving)
            if not live:
                return {"version": version, "pushed_to": [], "seconds": 0.0}
            t = time.monotonic()
            await self._push_to([self.replicas[r].url for r in live])
            return {"version": version, "pushed_to": live, "seconds": time.monotonic() - t}

    async def _sync(self, ranks: list[int], recs: dict[int, Record]) -> None:
        """Selective sync: only these replicas, only when they are behind the pipeline's version."""
        t = time.monotonic()
        versions = {r: (await self._state(self.replicas[r]))["weight_version"] for r in ranks}
        behind = [r for r in ranks if versions[r] != self.weights.version]
        if behind:
            await self._push_to([self.replicas[r].url for r in behind])
        for r in ranks:
            recs[r].phases["sync"] = time.monotonic() - t
            recs[r].detail["synced"] = r in behind

    async def _push_to(self, urls: list[str]) -> None:
        tensors = self.weights.tensors
        if tensors is None:
            raise ControllerError(
                f"pipeline {self.pipeline_id!r}: replicas {urls} are not at version "
                f"{self.weights.version} and no host copy of it exists"
            )
        from tidal.sync import WeightSender

        def push() -> Any:
            with WeightSender(
                urls, backend="shm", admin_key=self.config.admin_key, timeout_s=self.config.call_timeout_s
            ) as sender:
                return sender.push(tensors, version=self.weights.version)

        res = await asyncio.to_thread(push)
        if not res.ok:
            raise ControllerError(
                f"pipeline {self.pipeline_id!r}: weight push of version {self.weights.version} "
                f"to {urls} failed: {res.replicas}"
            )

    # ---- shrink phases -------------------------------------------------------------------------

    async def _drain(self, rank: int, rec: Record) -> None:
        t = time.monotonic()
        rep = self.replicas.get(rank)
        self.serving.discard(rank)
        if rep is not None:
            body = {"url": rep.url, "timeout_s": self.config.drain_timeout_s}
            moved = await self._router("POST", "/v1/replicas/drain", body, missing_ok=True)
            await self._router("DELETE", "/v1/replicas", {"url": rep.url}, missing_ok=True)
            rec.detail["moved"] = len(moved.get("moved", []))
        rec.phases["drain"] = time.monotonic() - t

    async def _release(self, rank: int, rec: Record) -> None:
        rep = self.replicas.get(rank)
        if rep is None:
            rec.detail["released"] = "never started"
            return
        if not rep.alive():
            await self._stop(rep, rec)
            return
        if self.config.release == "stop":
            await self._stop(rep, rec)
        else:
            await self._sleep(rep, rec)

    async def _sleep(self, rep: Replica, rec: Record) -> None:
        t = time.monotonic()
        before, rss0, dev0 = await self._state(rep), rss_bytes(rep.engine_pid), self._device_used(rep)
        await self._call(rep, "POST", "/v1/pause", {"mode": "abort"})
        reply = await self._call(rep, "POST", "/v1/sleep", {"tags": ["kv_cache", "weights"]})
        rep.asleep = True
        rec.phases["sleep"] = time.monotonic() - t
        t = time.monotonic()
        after, rss1, dev1 = await self._state(rep), rss_bytes(rep.engine_pid), self._device_used(rep)
        check = verify_sleep(
            before["memory_bytes"],
            reply["bytes_freed"],
            after["memory_bytes"],
            rss0 - rss1,
            None if dev0 is None or dev1 is None else dev0 - dev1,
            self.config,
        )
        rec.phases["verify"] = time.monotonic() - t
        rec.detail.update(released="sleep", **check)
        if not check["verified"]:
            raise ReleaseUnverified(
                f"pipeline {self.pipeline_id!r} replica {rep.rank} on slot {rep.slot}: "
                f"sleep released memory that could not be verified: {check}",
                rep.slot,
            )

    async def _stop(self, rep: Replica, rec: Record) -> None:
        t = time.monotonic()
        expected = 0
        if rep.alive():
            try:
                mem = (await self._state(rep))["memory_bytes"]
                expected = int(mem["kv_cache"]) + int(mem["weights"])
            except ControllerError:
                pass  # a dying replica: its exit is what is verified
        dev0 = self._device_used(rep)
        await stop_process(rep.proc, rep.engine_pid, self.config.call_timeout_s)
        rec.phases["stop"] = time.monotonic() - t
        t = time.monotonic()
        gone = not pid_alive(rep.engine_pid) and rep.proc.poll() is not None
        dev1 = self._device_used(rep)
        drop = None if dev0 is None or dev1 is None else dev0 - dev1
        dev_ok = drop is None or drop >= self.config.min_release_fraction * expected - self.config.release_slack_bytes
        rec.phases["verify"] = time.monotonic() - t
        rec.detail.update(
            released="stop",
            process_exited=gone,
            expected_bytes=expected,
            device_drop_bytes=drop,
            verified=gone and dev_ok,
        )
        del self.replicas[rep.rank]
        if not (gone and dev_ok):
            raise ReleaseUnverified(
                f"pipeline {self.pipeline_id!r} replica {rep.rank} on slot {rep.slot}: "
                f"stop not verified (process exited={gone}, device drop {drop} bytes of "
                f"{expected} expected)",
                rep.slot,
            )

    # ---- expand phases -------------------------------------------------------------------------

    async def _bring_up(self, rank: int, rec: Record) -> None:
        t = time.monotonic()
        rep = self.replicas.get(rank)
        if rep is not None and not rep.alive():  # killed while out of the router: start afresh
            await stop_process(rep.proc, rep.engine_pid, self.config.call_timeout_s)
            del self.replicas[rank]
            rep = None
        if rep is None:
            self.replicas[rank] = await self._start(rank)
            rec.phases["start"] = time.monotonic() - t
            return
        if rep.asleep:
            await self._call(rep, "POST", "/v1/wake_up", {})
            rep.asleep = False
        rec.phases["wake"] = time.monotonic() - t

    async def _join(self, rank: int, rec: Record) -> None:
        t = time.monotonic()
        rep = self.replicas[rank]
        state = await self._state(rep)
        if state["weight_version"] != self.weights.version:
            raise ControllerError(
                f"pipeline {self.pipeline_id!r} replica {rank}: serves weight_version="
                f"{state['weight_version']} after sync, expected {self.weights.version}"
            )
        if state["state"] != "serving":
            await self._call(rep, "POST", "/v1/resume", {})
        await self._router("POST", "/v1/replicas", {"url": rep.url})
        self.serving.add(rank)
        rec.phases["join"] = time.monotonic() - t
        rec.detail.update(weight_version=state["weight_version"], pipeline_version=self.weights.version)

    async def _start(self, rank: int) -> Replica:
        slot = self.spec.replica(rank)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = os.path.join(self.log_dir, f"replica-{rank}-{port}.log")
        cmd = [
            sys.executable,
            "-m",
            "tidal.cli",
            "serve",
            self.config.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            self.config.device,
            *self.config.serve_args,
        ]
        if self.config.admin_key:
            cmd += ["--admin-key", self.config.admin_key]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.config.device == "cpu":
            # glibc raises its mmap threshold after large frees, so a later KV cache can land on
            # the heap and a sleep would not give it back to the OS (RSS stays; verify fails).
            # A fixed threshold keeps large tensors mmapped: freeing them unmaps them.
            env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 20))
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, slot))
            cmd[cmd.index("--device") + 1] = "cuda"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        engine_pid = await self._wait_healthy(proc, url, log_path)
        return Replica(rank, slot, url, proc, engine_pid, log_path)

    async def _wait_healthy(self, proc: subprocess.Popen, url: str, log_path: str) -> int:
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ControllerError(
                    f"pipeline {self.pipeline_id!r}: replica {url} exited with "
                    f"{proc.returncode} while starting: {_tail(log_path)}"
                )
            try:
                r = await self.http.get(url + "/health", timeout=2.0)
                if r.status_code == 200:
                    return int(r.json()["engine_pid"])
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)  # polling a starting process, bounded by the deadline
        await stop_process(proc, None, 10.0)
        raise ControllerError(
            f"pipeline {self.pipeline_id!r}: replica {url} not healthy within "
            f"start_timeout_s={self.config.start_timeout_s}: {_tail(log_path)}"
        )

    # ---- lifetime ------------------------------------------------------------------------------

    async def close(self, kill: bool = False) -> list[dict[str, Any]]:
        """Stop every replica process (after any shrink/expand in flight; kill: SIGKILL at once, as
        when the pipeline crashes); returns, per replica, whether its processes exited. Expands
        after this raise."""
        async with self._lock:
            self.closed = True
            return await self._close(kill)

    async def _close(self, kill: bool) -> list[dict[str, Any]]:
        out = []
        for rank in sorted(self.replicas):
            rep = self.replicas[rank]
            self.serving.discard(rank)
            await self._router("DELETE", "/v1/replicas", {"url": rep.url}, missing_ok=True, quiet=True)
            if kill:
                kill_process(rep.proc, rep.engine_pid)
            await stop_process(rep.proc, rep.engine_pid, self.config.call_timeout_s)
            out.append(
                {
                    "rank": rank,
                    "slot": list(rep.slot),
                    "exited": rep.proc.poll() is not None and not pid_alive(rep.engine_pid),
                }
            )
        self.replicas.clear()
        await self.http.aclose()
        if self.config.log_dir is None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        return out

    # ---- helpers -------------------------------------------------------------------------------

    def _changed(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _device_used(self, rep: Replica) -> int | None:
        return device_used_bytes(rep.slot) if self.config.device == "cuda" else None

    async def _state(self, rep: Replica) -> dict[str, Any]:
        return await self._call(rep, "GET", "/v1/state", None)

    async def _call(self, rep: Replica, method: str, path: str, body: dict | None) -> dict[str, Any]:
        try:
            r = await self.http.request(method, rep.url + path, json=body)
        except httpx.HTTPError as e:
            raise ControllerError(
                f"pipeline {self.pipeline_id!r} replica {rep.rank} ({rep.url}): {method} {path} "
                f"failed: {type(e).__name__}: {e}"
            ) from e
        if r.status_code != 200:
            raise ControllerError(
                f"pipeline {self.pipeline_id!r} replica {rep.rank} ({rep.url}): {method} {path} "
                f"answered {r.status_code}: {r.text[:300]}"
            )
        return r.json()

    async def _router(
        self, method: str, path: str, body: dict, missing_ok: bool = False, quiet: bool = False
    ) -> dict[str, Any]:
        try:
            r = await self.http.request(
                method,
                self.router_url + path,
                json=body,
                timeout=self.config.drain_timeout_s + self.config.call_timeout_s,
            )
        except httpx.HTTPError as e:
            if quiet:
                return {}
            raise ControllerError(
                f"pipeline {self.pipeline_id!r}: router {method} {path} failed: {type(e).__name__}: {e}"
            ) from e
        if r.status_code == 404 and missing_ok:
            return {}
        if r.status_code != 200 and not quiet:
            raise ControllerError(
                f"pipeline {self.pipeline_id!r}: router {method} {path} {body} answered {r.status_code}: {r.text[:300]}"
            )
        return r.json() if r.status_code == 200 else {}


@dataclass(slots=True)
class RouterProcess:
    """A pipeline's endpoint: `tidal router` with no replicas yet; the controller adds them."""

    url: str
    proc: subprocess.Popen
    log_path: str

    @classmethod
    async def start(cls, log_dir: str, admin_key: str | None = None, timeout_s: float = 120.0) -> RouterProcess:
        port = free_port()
        log_path = os.path.join(log_dir, f"router-{port}.log")
        cmd = [
            sys.executable,
            "-m",
            "tidal.router.cli",
            "router",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--probe-interval",
            "0.2",
        ]
        if admin_key:
            cmd += ["--admin-key", admin_key]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0, headers=headers) as http:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise ControllerError(f"router exited with {proc.returncode}: {_tail(log_path)}")
                try:
                    if (await http.get(url + "/v1/replicas")).status_code == 200:
                        return cls(url, proc, log_path)
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)  # polling a starting process, bounded by the deadline
        await stop_process(proc, None, 10.0)
        raise ControllerError(f"router not up within {timeout_s}s: {_tail(log_path)}")

    async def stop(self) -> None:
        await stop_process(self.proc, None, 15.0)


def verify_sleep(
    before: dict[str, int],
    freed: dict[str, int],
    after: dict[str, int],
    rss_drop: int,
    device_drop: int | None,
    config: ControllerConfig,
) -> dict[str, Any]:
    """Is a sleep's release shown by more than the engine's word?

    1. the engine's bytes_freed per tag cover what /v1/state held before, and /v1/state holds 0
       after. On CPU bytes_freed are the tensors' bytes, equal to what was held; on CUDA they are
       measured from the allocator (segments rounded to its block sizes, small tensors sharing a
       segment with others), so "cover" is: at least min_release_fraction of it, less the slack;
       a release that leaves the allocator holding the memory fails here (first run on an H200,
       a tiny model: 4 MiB of KV measured freed, 0 of 0.4 MiB of weights);
    2. the process or device counters dropped by what was released: on GPU the device's used memory
       (NVML) by the bytes freed (on CUDA the engine measures bytes_freed from its allocator's
       reserved memory after empty_cache); on CPU the engine process's RSS by the KV cache bytes
       (on CPU, sleeping weights without discard moves them to host memory in the same process, so
       only the KV cache leaves the process).
    """
    total = sum(int(v) for v in freed.values())
    accounted = all(
        int(freed.get(t, -1)) >= 0
        and int(freed.get(t, -1)) >= config.min_release_fraction * int(before[t]) - config.release_slack_bytes
        for t in ("kv_cache", "weights")
    )
    emptied = all(int(after[t]) == 0 for t in ("kv_cache", "weights"))
    if device_drop is not None:
        expected, measured, counter = total, device_drop, "device_used"
    else:
        expected, measured, counter = int(freed.get("kv_cache", 0)), rss_drop, "process_rss"
    dropped = measured >= config.min_release_fraction * expected - config.release_slack_bytes
    return {
        "verified": accounted and emptied and dropped and total > 0,
        "reported_freed": dict(freed),
        "accounted": accounted,
        "emptied": emptied,
        "counter": counter,
        "expected_drop_bytes": expected,
        "measured_drop_bytes": measured,
    }


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ControllerError(f"pid {pid}: /proc/{pid}/status has no VmRSS line")


def device_used_bytes(gpus: tuple[int, ...]) -> int:
    """Used memory of these devices from NVML (pynvml), else from nvidia-smi (the same counters)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(g)).used for g in gpus)
        finally:
            pynvml.nvmlShutdown()
    except ImportError:
        pass
    ids = ",".join(map(str, gpus))
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", ids],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return sum(int(x) for x in out.split()) << 20


async def stop_process(proc: subprocess.Popen, engine_pid: int | None, timeout_s: float) -> None:
    """SIGTERM (the server drains and stops its engine), then SIGKILL what is left after timeout_s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10.0)
    if engine_pid is None:
        return
    deadline = time.monotonic() + timeout_s
    while pid_alive(engine_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the engine exits after its server: bounded wait
    if pid_alive(engine_pid):
        os.kill(engine_pid, signal.SIGKILL)


def kill_process(proc: subprocess.Popen, engine_pid: int | None) -> None:
    """SIGKILL a replica's server and engine processes (each only if still running)."""
    if proc.poll() is None:
        proc.kill()
    if engine_pid is not None and pid_alive(engine_pid):
        os.kill(engine_pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 1500) -> str:
    try:
        with open(path) as f:
            return f.read()[-n:]
    except OSError as e:
        return f"(no log: {e})"
