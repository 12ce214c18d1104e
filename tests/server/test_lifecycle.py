"""Process lifecycle of `tidal serve`, with real processes: a stopped engine process, SIGTERM,
connection limits, a server killed with SIGKILL, a busy port."""
from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from tests.server.conftest import free_port, pid_alive

LONG = {"prompt": "long", "max_tokens": 400, "ignore_eos": True}


async def _stream(client: httpx.AsyncClient, url: str, body: dict, got_first: asyncio.Event | None = None
                  ) -> tuple[int, list]:
    """(status, the stream's data items: dicts, and "[DONE]")."""
    items: list = []
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, [r.json()]
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                items.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
                if got_first is not None:
                    got_first.set()
    return 200, items


async def _wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.05)


async def test_stopped_engine_fails_requests_in_flight_and_serves_again(server_model, make_server):
    """SIGSTOP stands in for a stuck GPU or filesystem: the process lives, nothing answers."""
    s = make_server(server_model, "--max-num-seqs", "4", "--heartbeat-timeout", "2")
    stopped = False
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            async def running() -> bool:
                return (await client.get(s.url + "/v1/state")).json()["num_running"] >= 4

            streams = [asyncio.create_task(_stream(client, s.url, LONG)) for _ in range(2)]
            plain = [asyncio.create_task(client.post(s.url + "/v1/completions", json=LONG)) for _ in range(2)]
            await _wait_until(running, 30, "4 requests running")
            os.kill(s.engine_pid, signal.SIGSTOP)
            stopped = True
            t0 = time.monotonic()
            # heartbeat timeout 2 s + the 0.5 s watch interval; the rest is slack for a loaded machine
            for r in await asyncio.wait_for(asyncio.gather(*plain), 15):
                assert r.status_code == 503, r.text
                assert "not responding" in r.json()["error"]["message"] and r.headers.get("retry-after")
            for status, items in await asyncio.wait_for(asyncio.gather(*streams), 15):
                if status == 200:
                    errors = [x for x in items if isinstance(x, dict) and "error" in x]
                    assert errors and "not responding" in errors[0]["error"]["message"], items
                    assert items[-1] == "[DONE]"
                else:
                    assert status == 503, items
            assert time.monotonic() - t0 < 15
            t1 = time.monotonic()
            r = await asyncio.wait_for(client.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}), 5)
            assert r.status_code == 503 and time.monotonic() - t1 < 5, r.text
            r = await asyncio.wait_for(client.post(s.url + "/v1/pause", json={}), 5)
            assert r.status_code == 503, r.text
            assert (await client.get(s.url + "/health")).status_code == 503

            os.kill(s.engine_pid, signal.SIGCONT)
            stopped = False

            async def healthy() -> bool:
                return (await client.get(s.url + "/health")).status_code == 200
            await _wait_until(healthy, 30, "/health ok after SIGCONT")
            r = await client.post(s.url + "/v1/completions", json={"prompt": "back", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
            status, items = await _stream(client, s.url, {"prompt": "back", "max_tokens": 3})
            assert status == 200 and items[-1] == "[DONE]" and items[-2]["choices"][0]["finish_reason"] == "length"
    finally:
        if stopped:
            os.kill(s.engine_pid, signal.SIGCONT)
        assert s.stop() == 0


async def test_sigterm_ends_every_request_with_its_output_and_exits_0(server_model, make_server):
    """One sequence at a time: the short request finishes within the grace period, the long
    ones (one running, two waiting) end with finish_reason "abort" and their partial output."""
    s = make_server(server_model, "--max-num-seqs", "1", "--shutdown-grace-s", "0.3", "--log-level", "info")
    try:
        await _sigterm_with_requests_in_flight(s)
    finally:
        s.stop()   # a no-op once it has exited


async def _sigterm_with_requests_in_flight(s) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        first = asyncio.Event()
        short = asyncio.create_task(_stream(client, s.url, {"prompt": "short", "max_tokens": 8}, first))
        await asyncio.wait_for(first.wait(), 30)
        longs = [asyncio.create_task(_stream(client, s.url, {**LONG, "max_tokens": 500})) for _ in range(3)]
        plain = asyncio.create_task(client.post(s.url + "/v1/completions", json=LONG))

        async def queued() -> bool:
            st = (await client.get(s.url + "/v1/state")).json()
            return st["num_running"] + st["num_waiting"] >= 4
        await _wait_until(queued, 30, "4 requests queued")
        s.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        async with httpx.AsyncClient(timeout=5) as fresh:
            with pytest.raises(httpx.HTTPError):  # the listener is closed: nothing new is admitted
                await _wait_until(lambda: _refused(fresh, s.url), 10, "listener closed")
        results = await asyncio.wait_for(asyncio.gather(short, *longs), 30)
        r = await asyncio.wait_for(plain, 30)
    reasons = []
    for status, items in results:
        assert status == 200 and items[-1] == "[DONE]", items
        final = items[-2]["choices"][0]
        assert not any("error" in x for x in items[:-1] if isinstance(x, dict)), items
        reasons.append(final["finish_reason"])
    assert reasons[0] == "length"                   # finished within the grace period
    assert reasons[2:] == ["abort", "abort"]        # still waiting when it ran out
    assert reasons[1] in ("abort", "length")
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "abort", r.text
    assert s.proc.wait(30) == 0
    assert time.monotonic() - t0 < 30
    out = s.output()
    assert "Traceback" not in out and "ERROR" not in out, out
    deadline = time.monotonic() + 10
    while pid_alive(s.engine_pid):
        assert time.monotonic() < deadline, "the engine process outlived the server"
        time.sleep(0.05)


async def _refused(client: httpx.AsyncClient, url: str) -> bool:
    """Raises once the server refuses connections; False while it still answers."""
    await client.get(url + "/health")
    return False


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True when the server closes `sock` within `timeout` (reading whatever it sends first)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    return False


def test_idle_trickling_and_excess_connections_are_bounded(server_model, make_server):
    s = make_server(server_model, "--header-timeout", "2", "--timeout-keep-alive", "1",
                    "--limit-concurrency", "6")
    socks = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(12)]
    try:
        for k in socks[6:]:   # half send nothing, half trickle an unfinished request head
            k.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        r = httpx.get(s.url + "/health", timeout=10)
        assert r.status_code == 503, r.text       # 12 connections open, the limit is 6
        t0 = time.monotonic()
        for k in socks:
            assert _closed_by_server(k, 10), "an idle connection was held open past the header timeout"
        assert time.monotonic() - t0 < 10
        assert httpx.get(s.url + "/health", timeout=10).status_code == 200   # served again

        k = socket.create_connection(("127.0.0.1", s.port))   # a finished request: keep-alive applies
        socks.append(k)
        k.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _closed_by_server(k, 10)
    finally:
        for k in socks:
            k.close()
        assert s.stop() == 0


def _ipc_dirs(pid: int) -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), f"tidal-ipc-{pid}-*"))


def test_sigkilled_server_leaves_no_ipc_directory_after_the_next_start(server_model, make_server):
    s = make_server(server_model)
    dirs = _ipc_dirs(s.proc.pid)
    os.kill(s.proc.pid, signal.SIGKILL)
    assert len(dirs) == 1 and os.path.exists(os.path.join(dirs[0], "owner")), dirs
    s.proc.wait(10)
    deadline = time.monotonic() + 15
    while pid_alive(s.engine_pid):   # it dies with its parent
        assert time.monotonic() < deadline, "the engine process outlived its SIGKILLed server"
        time.sleep(0.05)
    assert os.path.isdir(dirs[0])    # nobody was left to remove it
    # A directory of a live owner (this test process) must survive the clean-up.
    from tidal.server import ipc_dir
    live = ipc_dir.create()
    try:
        s2 = make_server(server_model)
        try:
            assert not os.path.exists(dirs[0]), "the stale ipc directory is still there"
            assert os.path.isdir(live)
            assert len(_ipc_dirs(s2.proc.pid)) == 1
        finally:
            assert s2.stop() == 0
        assert _ipc_dirs(s2.proc.pid) == []   # a clean stop removes its own
    finally:
        ipc_dir.remove(live)


def test_busy_port_is_reported_before_the_model_loads(server_model):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "tidal.cli", "serve", server_model, "--port", str(port)],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"127.0.0.1:{port}" in r.stderr and "--port" in r.stderr, r.stderr
    assert "engine" not in (r.stdout + r.stderr).lower(), r.stderr   # no engine was started


def test_serve_rejects_non_positive_limits(server_model):
    r = subprocess.run([sys.executable, "-m", "tidal.cli", "serve", server_model, "--port", str(free_port()),
                        "--shutdown-grace-s", "-1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--shutdown-grace-s=-1" in r.stderr, r.stderr


def test_a_starting_servers_ipc_directory_survives_other_servers_cleaning(tmp_path, monkeypatch):
    """Many replicas start at once: each one's clean_stale must never take another's directory
    while it is being created (an empty owner file read as "owner gone" once did)."""
    import threading

    from tidal.server import ipc_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stop = threading.Event()
    removed: list[str] = []

    def cleaner() -> None:
        while not stop.is_set():
            removed.extend(ipc_dir.clean_stale(str(tmp_path)))

    t = threading.Thread(target=cleaner)
    t.start()
    try:
        made = [ipc_dir.create() for _ in range(300)]
    finally:
        stop.set()
        t.join(10)
    assert removed == [] and all(os.path.isfile(os.path.join(d, "owner")) for d in made)
