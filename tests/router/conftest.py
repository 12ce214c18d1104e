"""Two real `tidal serve` replicas behind a real `tidal router` process, on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.conftest import Server as _Server
from tests.server.conftest import free_port, pid_alive


class Server(_Server):
    def _wait_ready(self, timeout: float = 400.0) -> None:   # two start at once on a busy 2-core machine
        super()._wait_ready(timeout)


class RouterProc:
    """`python -m tidal.router.cli router --replica URL ...` in a subprocess."""

    def __init__(self, replicas: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="tidal-router-", suffix=".log", delete=False)
        # TIDAL_TEST_ROUTER_UPSTREAM=http runs these tests over a connection per request
        cmd = [sys.executable, "-m", "tidal.router.cli", "router", "--port", str(self.port),
               "--log-level", "warning", "--probe-interval", "0.2",
               "--upstream", os.environ.get("TIDAL_TEST_ROUTER_UPSTREAM", "channel")]
        for u in replicas:
            cmd += ["--replica", u]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:     # 503 with no replica up yet is an answer too: the router itself serves
                r = httpx.get(self.url + "/health", timeout=2)
                # Every replica up, not just one: a test that starts before the router's first probe
                # of a replica has answered would route everything to the other (and drain nothing).
                if (r.status_code == 200 and r.json().get("replicas_up") == len(replicas)) if replicas \
                        else r.status_code in (200, 503):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"router not healthy:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def kill_replica(s: Server) -> None:
    """SIGKILL the server and its engine process: the replica dies without a word."""
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait()
    if s.engine_pid is not None and pid_alive(s.engine_pid):
        os.kill(s.engine_pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def fleet(tiny_ckpt, tmp_path_factory):
    """(router, [replica A, replica B]); B only accepts weight updates under an empty directory."""
    model = tiny_ckpt("llama")
    root = str(tmp_path_factory.mktemp("weights-root"))
    with ThreadPoolExecutor(2) as pool:      # both start at once: each start waits on its own health
        fa = pool.submit(Server, model, "--max-num-seqs", "64")
        fb = pool.submit(Server, model, "--max-num-seqs", "64", "--weights-root", root)
        a, b = fa.result(), fb.result()
    r = RouterProc([a.url, b.url])
    yield r, [a, b]
    r.stop()
    for s in (a, b):
        if s.proc.poll() is None:
            s.stop()
