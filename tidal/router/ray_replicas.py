"""`tidal serve` replicas as Ray actors, registered with a `tidal router`.

    fleet = start_replicas(4, ["/models/qwen3", "--max-num-seqs", "128"], router_url="http://10.0.0.1:8080")
    ...                       # the trainer talks to the router; fleet.urls are the replicas
    fleet.stop()

Each actor owns one `tidal serve` process on the node Ray placed it on (num_gpus=1 on a cluster
with GPUs: one replica per GPU, Ray sets its CUDA_VISIBLE_DEVICES), reports the URL it serves on,
and is registered through the router's admin API (POST /v1/replicas). The serve process is tied
to its actor (PR_SET_PDEATHSIG): a killed actor is a killed replica to the router, whose health
probe sees it down within a probe interval and whose streams continue on the other replicas.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import ray


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the actor's process goes, however it goes."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


class ServeReplica:
    """The body of one replica actor: a `tidal serve` child on this node."""

    def __init__(self, serve_args: list[str], host: str | None = None, env: dict[str, str] | None = None) -> None:
        self.host = host or ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="tidal-ray-replica-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "tidal.cli", "serve", *serve_args, "--host", self.host, "--port", str(self.port)]
        pdeath = _die_with_parent if sys.platform.startswith("linux") else None
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, preexec_fn=pdeath
        )

    def wait_ready(self, timeout_s: float = 600.0, headers: dict[str, str] | None = None) -> str:
        """The replica's URL once its /health answers 200; raises if the process exits first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tidal serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", headers=headers or {}, timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"tidal serve at {self.url} not healthy within {timeout_s}s:\n{self.output()[-4000:]}")

    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Ctrl-C, then SIGKILL after `timeout_s`; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


ServeReplicaActor = ray.remote(ServeReplica)


@dataclass(slots=True)
class RayReplicas:
    """The started actors, their URLs, and the router they joined (None: not registered)."""

    actors: list[Any]
    urls: list[str]
    router_url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def register(self, url: str) -> dict:
        if self.router_url is None:
            raise RuntimeError(f"register({url!r}): this fleet joined no router (router_url=None)")
        r = httpx.post(self.router_url + "/v1/replicas", json={"url": url}, headers=self.headers, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"router {self.router_url} refused replica {url}: {r.status_code} {r.text[:300]}")
        return r.json()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Out of the router (its requests move to the others), then each serve process and actor ends."""
        for url in self.urls:
            if self.router_url is not None:
                try:
                    httpx.request(
                        "DELETE",
                        self.router_url + "/v1/replicas",
                        json={"url": url},
                        headers=self.headers,
                        timeout=timeout_s + 30,
                    )
                except httpx.HTTPError:
                    pass  # the router is gone: nothing to leave
        for actor in self.actors:
            try:
                ray.get(actor.stop.remote(timeout_s), timeout=timeout_s + 30)
            except (ray.exceptions.RayError, TimeoutError):
                pass  # a killed actor took its serve process with it
            ray.kill(actor)


def start_replicas(
    n: int,
    serve_args: list[str],
    router_url: str | None = None,
    *,
    num_gpus: float | None = None,
    num_cpus: float = 1,
    host: str | None = None,
    admin_key: str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 600.0,
) -> RayReplicas:
    """N replica actors (Ray must be initialised), healthy and registered with `router_url`.

    num_gpus: per replica; None → 1 when the cluster has GPUs, else 0. host: the address each
    replica binds and is reached at; None → its node's IP address (replicas on other machines)."""
    if n < 1:
        raise ValueError(f"n={n}: expected at least 1 replica")
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    opts = {"num_gpus": num_gpus, "num_cpus": num_cpus, "max_restarts": 0, "max_task_retries": 0}
    actors: list[Any] = [ServeReplicaActor.options(**opts).remote(list(serve_args), host, env) for _ in range(n)]
    fleet = RayReplicas(actors, [], router_url, headers)
    try:
        fleet.urls = ray.get([a.wait_ready.remote(timeout_s, headers) for a in actors], timeout=timeout_s + 60)
        if router_url is not None:
            for url in fleet.urls:
                fleet.register(url)
    except BaseException:
        fleet.router_url = None
        fleet.stop()
        raise
    return fleet
