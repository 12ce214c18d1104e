"""`tidal serve MODEL --data-parallel-size 2` as a user runs it: one process, two replicas behind
its router — as child processes (the default `mp` backend) and as Ray actors (`--data-parallel-
backend ray`, vLLM's flag) — serving, listing both replicas up, and taking them down on Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from tests.server.conftest import free_port

BODY = {"prompt": "data parallel", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def run_serve(model: str, *extra: str, timeout_s: float = 400.0):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="tidal-dp-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "tidal.cli", "serve", model, "--data-parallel-size", "2", "--host", "127.0.0.1",
           "--port", str(port), "--block-size", "4", "--num-kv-blocks", "512", "--max-num-seqs", "8",
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(log.name).read()[-4000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise AssertionError(f"not healthy within {timeout_s}s: {open(log.name).read()[-4000:]}")


def check_serves_then_stops(proc, url: str, log) -> None:
    try:
        replicas = httpx.get(url + "/v1/replicas", timeout=10).json()["replicas"]
        assert len(replicas) == 2 and {r["state"] for r in replicas.values()} == {"up"}, replicas
        assert all(u.startswith("http://127.0.0.1:") for u in replicas)
        r = httpx.post(url + "/v1/completions", json=BODY, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
        direct = [httpx.post(u + "/v1/completions", json=BODY, timeout=120).json() for u in replicas]
        assert {d["choices"][0]["text"] for d in direct} == {r.json()["choices"][0]["text"]}
        state = httpx.get(url + "/v1/state", timeout=30).json()
        assert set(state["replicas"]) == set(replicas)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"did not stop on SIGINT: {open(log.name).read()[-4000:]}") from None
    deadline = time.monotonic() + 60  # the replicas went with it
    while time.monotonic() < deadline:
        up = []
        for u in replicas:
            try:
                httpx.get(u + "/health", timeout=1)
                up.append(u)
            except httpx.HTTPError:
                pass
        if not up:
            return
        time.sleep(0.25)
    raise AssertionError(f"replicas still answering after the router stopped: {up}")


def test_mp_backend(tiny_ckpt):
    check_serves_then_stops(*run_serve(tiny_ckpt("llama")))


def test_ray_backend(tiny_ckpt):
    """A local Ray instance started by the serve process (~20 s on the 2-core machine, idle)."""
    pytest.importorskip("ray")
    check_serves_then_stops(
        *run_serve(tiny_ckpt("llama"), "--data-parallel-backend", "ray", "--data-parallel-replica-host", "127.0.0.1")
    )


def test_replica_command_lines_leave_out_the_router_flags():
    """Each replica gets the serve flags; the data-parallel and router flags (read off the parser,
    both spellings) stay with the router, or a replica would start a router of its own."""
    from tidal.cli import build_parser
    from tidal.router.cli import replica_argv

    argv = ["serve", "m", "--data-parallel-size", "2", "--data-parallel-backend=mp", "--prefix-slack=3",
            "--probe-interval", "1", "--host", "0.0.0.0", "--port", "9", "--max-num-seqs", "4", "--api-key", "k"]
    args = build_parser().parse_args(argv)
    assert replica_argv(args, argv) == ["serve", "m", "--max-num-seqs", "4", "--api-key", "k"]
