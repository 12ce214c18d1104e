"""sglang-router (PyPI's Rust binary, unmodified) in front of two `tidal serve` replicas, routing
SGLang's `/generate`: both replicas get traffic and every routed answer equals the one a replica
gives directly. Runs in CI (sglang-router is in the test extra: one wheel, seconds to install)."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from tests.compat.conftest import require_module
from tests.server.conftest import Server, free_port

pytestmark = pytest.mark.timeout(600)
PROMPTS = [f"prompt {i}: the tide" for i in range(6)]


class Router:
    """`python -m sglang_router.launch_router` on 127.0.0.1 (its metrics port too), round robin."""

    def __init__(self, worker_urls: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sglang-router-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(self.port),
               "--worker-urls", *worker_urls, "--policy", "round_robin", "--log-level", "warn",
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_workers(len(worker_urls))

    def _wait_workers(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"sglang-router exited {self.proc.returncode}:\n{self.output()}"
            try:
                workers = httpx.get(self.url + "/workers", timeout=2).json()["workers"]
                if sum(w["is_healthy"] for w in workers) == n:
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"sglang-router did not report {n} healthy workers in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return open(self.log.name).read()[-4000:]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def generate_count(server: Server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    m = re.search(r'tidal_http_requests_total\{endpoint="/generate",status="200"\} ([0-9.]+)', text)
    return float(m.group(1)) if m else 0.0


def generate(url: str, prompt: str) -> dict:
    body = {"text": prompt, "sampling_params": {"temperature": 0}}
    r = httpx.post(url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, (url, r.status_code, r.text)
    return r.json()


@pytest.fixture(scope="module")
def replicas(compat_model):
    require_module("sglang_router", "sglang-router==0.3.2")
    servers = [Server(compat_model, "--max-num-seqs", "4") for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


def test_router_round_robins_generate_over_two_replicas(replicas):
    router = Router([s.url for s in replicas])
    try:
        before = [generate_count(s) for s in replicas]
        routed = [generate(router.url, p) for p in PROMPTS]
        after = [generate_count(s) for s in replicas]
    finally:
        router.stop()
    served = [a - b for a, b in zip(after, before)]
    assert sum(served) == len(PROMPTS) and min(served) >= 1, f"per-replica /generate counts {served}"
    direct = [generate(replicas[0].url, p) for p in PROMPTS]
    for p, got, want in zip(PROMPTS, routed, direct):
        assert (got["output_ids"], got["text"]) == (want["output_ids"], want["text"]), p
        assert got["output_ids"], p
