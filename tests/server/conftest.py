"""Real `tidal serve` processes on 127.0.0.1 with a free port, over tiny checkpoints."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    """`python -m tidal.cli serve MODEL ...` in a subprocess; stop() is Ctrl-C."""

    def __init__(self, model: str, *args: str, admin_key: str | None = None, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key, self.api_key = admin_key, api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="tidal-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "tidal.cli", "serve", model, "--port", str(self.port),
               "--block-size", "4", "--num-kv-blocks", "1024", "--log-level", "warning", *args]
        if admin_key:
            cmd += ["--admin-key", admin_key]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.engine_pid: int | None = None
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tidal serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200:
                    self.engine_pid = r.json()["engine_pid"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError(f"tidal serve did not become healthy in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def admin_headers(self) -> dict[str, str]:
        key = self.admin_key or self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def control(self, path: str, body: dict | None = None, method: str = "POST", timeout: float = 60) -> dict:
        r = httpx.request(method, self.url + path, json=body, headers=self.admin_headers(), timeout=timeout)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    def stop(self, timeout: float = 30.0) -> int:
        """Ctrl-C; returns the exit code. Kills what is left after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.engine_pid is not None:
            deadline = time.monotonic() + 10
            while pid_alive(self.engine_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(self.engine_pid):
                os.kill(self.engine_pid, signal.SIGKILL)
                raise AssertionError(f"engine process {self.engine_pid} outlived the server")
        return self.proc.returncode


@pytest.fixture(scope="session")
def server_model(tiny_ckpt) -> str:
    return tiny_ckpt("llama")


@pytest.fixture(scope="session")
def server(server_model):
    """A shared default server (max_num_seqs=8). Tests leave it serving."""
    s = Server(server_model, "--max-num-seqs", "8")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def make_server():
    """make_server(model, *cli_args, admin_key=None, api_key=None) -> a started Server."""
    return Server
