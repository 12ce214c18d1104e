"""Security and failure paths over HTTP: keys, --weights-root, update_weights, a killed engine
core process, Ctrl-C."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from tidal.models.tiny import make_tiny_checkpoint

CONTROL = [("POST", "/v1/pause", {"mode": "abort"}), ("POST", "/v1/resume", None), ("GET", "/v1/is_paused", None),
           ("POST", "/v1/abort_requests", {"abort_all": True}), ("POST", "/v1/sleep", {"tags": ["kv_cache"]}),
           ("POST", "/v1/wake_up", {}), ("POST", "/v1/update_weights", {"path": "/tmp"}),
           ("POST", "/v1/flush_cache", None), ("GET", "/v1/state", None)]


@pytest.fixture(scope="module")
def weights_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights-root")
    make_tiny_checkpoint(str(root / "v2"), "llama", seed=1)
    return root


@pytest.fixture(scope="module")
def secured(server_model, make_server, weights_root):
    s = make_server(server_model, "--weights-root", str(weights_root), "--log-level", "info",
                    api_key="user-key", admin_key="admin-key")
    yield s
    s.stop()


def _state(s) -> dict:
    st = s.control("/v1/state", method="GET")
    counts = {k: v for k, v in st["control_ops"].items() if k != "state"}
    return {"state": st["state"], "weight_version": st["weight_version"], "ops": counts,
            "sleeping": st["sleeping"]}


def test_control_endpoints_need_the_admin_key(secured):
    before = _state(secured)
    for headers in ({}, {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-ke"},
                    {"Authorization": "admin-key"}, {"Authorization": "Basic admin-key"}):
        for method, path, body in CONTROL:
            r = httpx.request(method, secured.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
    assert _state(secured) == before   # nothing changed


def test_inference_needs_the_api_key(secured):
    body = {"prompt": "x", "max_tokens": 2}
    assert httpx.post(secured.url + "/v1/completions", json=body, timeout=30).status_code == 401
    assert httpx.get(secured.url + "/v1/models", timeout=30).status_code == 401
    r = httpx.post(secured.url + "/v1/completions", json=body, headers=secured.headers(), timeout=30)
    assert r.status_code == 200
    assert httpx.get(secured.url + "/health", timeout=30).status_code == 200   # probes stay open
    assert httpx.get(secured.url + "/metrics", timeout=30).status_code == 200


def test_update_weights_confined_to_weights_root(secured, weights_root, server_model, tmp_path):
    h = secured.admin_headers()
    url = secured.url + "/v1/update_weights"
    link = weights_root / "escape"
    if not link.exists():
        os.symlink(server_model, link)
    for path in (server_model, str(weights_root / ".." / os.path.basename(server_model)), str(link)):
        r = httpx.post(url, json={"path": path, "version": 9}, headers=h, timeout=30)
        assert r.status_code == 403 and "weights-root" in r.json()["error"]["message"], r.text
    r = httpx.post(url, json={"path": str(weights_root / "missing")}, headers=h, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "path"
    assert _state(secured)["weight_version"] == 0

    gen = {"input_ids": [5, 6, 7], "sampling_params": {"max_tokens": 6, "temperature": 0, "ignore_eos": True}}
    before = httpx.post(secured.url + "/generate", json=gen, headers=secured.headers(), timeout=30).json()
    bad = {"model.embed_tokens.weight": "0" * 64}
    r = httpx.post(url, json={"path": str(weights_root / "v2"), "version": 2, "checksums": bad}, headers=h, timeout=60)
    assert r.status_code == 400 and "checksum" in r.json()["error"]["message"], r.text  # bad input (issue 10, 14)
    r = httpx.post(url, json={"path": str(weights_root / "v2"), "version": 2}, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["weight_version"] == 2
    after = httpx.post(secured.url + "/generate", json=gen, headers=secured.headers(), timeout=30).json()
    assert before["weight_version"] == 0 and after["weight_version"] == 2
    assert after["output_ids"] != before["output_ids"]


def test_sleep_wake_over_http(secured):
    c = secured.control
    r = httpx.post(secured.url + "/v1/sleep", json={"tags": ["kv_cache"]}, headers=secured.admin_headers(), timeout=30)
    assert r.status_code == 409 and "pause" in r.json()["error"]["message"]   # serving: refused
    c("/v1/pause", {"mode": "abort"})
    res = c("/v1/sleep", {"tags": ["kv_cache", "weights"]})
    assert res["state"] == "sleeping" and res["bytes_freed"]["kv_cache"] > 0
    assert c("/v1/is_paused", method="GET")["is_paused"] is True
    assert c("/v1/wake_up", {})["state"] == "paused"
    c("/v1/resume")
    r = httpx.post(secured.url + "/v1/completions", json={"prompt": "awake", "max_tokens": 3},
                   headers=secured.headers(), timeout=30)
    assert r.status_code == 200


async def test_killed_engine_fails_fast_and_server_stays_up(server_model, make_server):
    s = make_server(server_model, "--max-num-seqs", "4")
    try:
        long = {"prompt": "long", "max_tokens": 400, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=60) as client:
            async def stream() -> tuple[int, str | None]:
                async with client.stream("POST", s.url + "/v1/completions", json={**long, "stream": True}) as r:
                    if r.status_code != 200:
                        return r.status_code, None
                    async for line in r.aiter_lines():
                        if line.startswith("data: {") and "error" in json.loads(line[6:]):
                            return 200, json.loads(line[6:])["error"]["message"]
                return 200, None

            plain = [asyncio.create_task(client.post(s.url + "/v1/completions", json=long)) for _ in range(3)]
            streams = [asyncio.create_task(stream()) for _ in range(3)]
            deadline = time.monotonic() + 30
            while (await client.get(s.url + "/v1/state")).json()["num_running"] < 4:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            os.kill(s.engine_pid, signal.SIGKILL)
            t0 = time.monotonic()
            while (await client.get(s.url + "/health")).status_code == 200:
                assert time.monotonic() - t0 < 5, "/health still passes 5 s after the engine died"
                await asyncio.sleep(0.05)
            health = (await client.get(s.url + "/health")).json()
            assert health["status"] == "unhealthy" and "exit" in health["reason"]
            for r in await asyncio.wait_for(asyncio.gather(*plain), 10):
                assert r.status_code >= 500 and "engine" in r.json()["error"]["message"]
            for status, err in await asyncio.wait_for(asyncio.gather(*streams), 10):
                assert status >= 500 or (err is not None and "engine" in err)
            t1 = time.monotonic()
            r = await client.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert r.status_code >= 500 and time.monotonic() - t1 < 5
            r = await client.post(s.url + "/v1/pause", json={})
            assert r.status_code >= 500
            assert (await client.get(s.url + "/metrics")).status_code == 200
    finally:
        assert s.stop() == 0


def test_ctrl_c_stops_server_and_engine(secured):
    """Last in this module: Ctrl-C on the secured server ends it and its engine process."""
    assert secured.engine_pid is not None
    assert secured.stop() == 0      # Server.stop asserts the engine process is gone too
    out = secured.output()
    assert f"at {secured.url}" in out and "Traceback" not in out, out   # startup logs the URL
    assert "nanobind" not in out, out                      # no interpreter-teardown noise
    assert out.count("engine core ready") == 1, out        # said once, not by both processes
