"""Replicas as Ray actors on a local CPU-only Ray instance, registered with a real router; a
killed actor is a killed replica: its streams continue on the other one.

Marked slow: Ray's start and two replicas' take ~110 s on a loaded 2-core machine (`-m slow`)."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.router.conftest import RouterProc
from tests.router.test_router import _stream
from tests.server.conftest import pid_alive

ray = pytest.importorskip("ray")

from tidal.router.ray_replicas import start_replicas  # noqa: E402

LONG = {"max_tokens": 200, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def ray_fleet(tiny_ckpt):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    router = RouterProc([])
    args = [tiny_ckpt("llama"), "--block-size", "4", "--num-kv-blocks", "1024", "--max-num-seqs", "16",
            "--log-level", "warning"]
    fleet = start_replicas(2, args, router.url, host="127.0.0.1", env={"OMP_NUM_THREADS": "1"}, timeout_s=400)
    yield router, fleet
    fleet.stop()
    router.stop()
    ray.shutdown()


@pytest.mark.slow
def test_ray_replicas_join_the_router_and_a_killed_actor_is_a_killed_replica(ray_fleet):
    router, fleet = ray_fleet
    listed = httpx.get(router.url + "/v1/replicas", timeout=10).json()["replicas"]
    assert set(listed) == set(fleet.urls) and {r["state"] for r in listed.values()} == {"up"}
    pids = dict(zip(fleet.urls, ray.get([a.pid.remote() for a in fleet.actors])))

    async def run() -> dict:
        first = asyncio.Event()
        async with httpx.AsyncClient(timeout=120) as client:
            task = asyncio.create_task(_stream(client, router.url, {**LONG, "prompt": "ray"}, first=first))
            await asyncio.wait_for(first.wait(), 60)
            serving = next(u for u, r in (await client.get(router.url + "/v1/replicas")).json()["replicas"].items()
                           if r["in_flight"])
            ray.kill(fleet.actors[fleet.urls.index(serving)])
            return {"out": await task, "killed": serving}

    got = asyncio.run(run())
    other = next(u for u in fleet.urls if u != got["killed"])
    want = httpx.post(other + "/v1/completions", json={**LONG, "prompt": "ray"}, timeout=120).json()
    assert got["out"]["finish"] == "length" and got["out"]["ids"] == want["choices"][0]["token_ids"]
    assert got["out"]["final"]["moved_at"], "the stream should have moved off the killed replica"
    deadline = time.monotonic() + 30          # the serve process went with its actor
    while pid_alive(pids[got["killed"]]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pids[got["killed"]])
    health = httpx.get(router.url + "/health", timeout=10).json()
    assert health["replicas"][got["killed"]]["state"] == "down" and health["replicas"][other]["state"] == "up"
