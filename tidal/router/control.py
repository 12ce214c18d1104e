"""Control calls on the endpoint: fan out to every replica under one deadline, one itemised reply.

Weight updates are transactional across replicas. From a directory (`/v1/update_weights`, which
each replica commits on its own): pause(keep) all → update all → if any failed, re-update the
others from the checkpoint the router recorded they served before → resume all. Paused replicas
generate nothing, so no client sees a token of the new version unless every replica has it. With
stage/commit ops (`/v1/update_weights_from_*` with commit=false, `/v1/commit_weights`,
`/v1/abort_staged`, the weight-transfer routes): stage on all → commit on all only if all staged,
else abort the staged copies. A replica that fails at commit or at rollback is fenced: out of
routing, shown in /health and /v1/state, until it is registered again.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import httpx

from tidal.router.replicas import DOWN, FENCED, Replica

if TYPE_CHECKING:
    from tidal.router.app import Router

FANOUT_GET = ("/v1/state", "/v1/is_paused", "/health")
FANOUT_POST = (
    "/v1/pause",
    "/v1/resume",
    "/v1/abort_requests",
    "/v1/sleep",
    "/v1/wake_up",
    "/v1/flush_cache",
    "/v1/abort_staged",
)


async def call(router: Router, rep: Replica, method: str, path: str, body: dict | None, timeout_s: float) -> dict:
    """One replica's part: its JSON reply, or {"error", "status"}."""
    try:
        r = await router.http.request(
            method, rep.url + path, json=body, headers=router.upstream_headers, timeout=timeout_s
        )
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}" or type(e).__name__, "status": None}
    try:
        data: Any = r.json()
    except ValueError:
        data = {"text": r.text[:500]}
    if r.status_code >= 400:
        return {"error": data.get("error", data) if isinstance(data, dict) else data, "status": r.status_code}
    return data


async def fan_out(
    router: Router,
    method: str,
    path: str,
    body: dict | None,
    timeout_s: float,
    replicas: list[Replica] | None = None,
    bodies: dict[str, dict] | None = None,
) -> dict:
    """The same call on every replica at once; each one's result or error under one deadline."""
    reps = list(router.replicas.replicas.values()) if replicas is None else replicas

    async def one(rep: Replica) -> dict:
        if rep.state == DOWN and path != "/health":
            return {"error": f"replica is down: {rep.reason}", "status": None}
        b = bodies.get(rep.url, body) if bodies is not None else body
        try:
            return await asyncio.wait_for(call(router, rep, method, path, b, timeout_s), timeout_s)
        except asyncio.TimeoutError:
            return {"error": f"no reply within the deadline of {timeout_s}s", "status": None}

    results = await asyncio.gather(*(one(r) for r in reps))
    by_url = {r.url: res for r, res in zip(reps, results)}
    return {"ok": bool(reps) and all("error" not in res for res in results), "replicas": by_url}


def abort_bodies(router: Router, body: dict) -> dict[str, dict] | None:
    """Client request ids → the upstream ids each replica knows them by."""
    ids = body.get("request_ids")
    if not isinstance(ids, list):
        return None
    out: dict[str, dict] = {}
    for url in router.replicas.replicas:
        mapped: list[str] = []
        for rid in ids:
            f = router.flights.get(rid)
            mapped += f.upstream_ids if f is not None and f.upstream_ids else [rid]
        out[url] = {**body, "request_ids": mapped}
    return out


async def update_weights(router: Router, body: dict, timeout_s: float) -> dict:
    """Directory update on all replicas, all or none (see the module docstring)."""
    reps = [r for r in router.replicas.replicas.values() if r.state not in (DOWN, FENCED)]
    if not reps:
        return {"ok": False, "replicas": {}, "error": "no replica is up"}
    paused = await fan_out(router, "POST", "/v1/pause", {"mode": "keep"}, timeout_s, reps)
    if not paused["ok"]:
        await fan_out(router, "POST", "/v1/resume", {}, timeout_s, reps)
        return {"ok": False, "phase": "pause", "replicas": paused["replicas"]}
    before = {r.url: dict(r.weights) for r in reps}
    updated = await fan_out(router, "POST", "/v1/update_weights", body, timeout_s, reps)
    result: dict[str, Any] = {"ok": updated["ok"], "phase": "update", "replicas": updated["replicas"]}
    if updated["ok"]:
        for r in reps:
            r.weights = {**r.weights, "path": body["path"], "version": updated["replicas"][r.url].get("weight_version")}
    else:
        result["rolled_back"] = await _roll_back(
            router, [r for r in reps if "error" not in updated["replicas"][r.url]], before, timeout_s
        )
    resumed = await fan_out(router, "POST", "/v1/resume", {}, timeout_s, [r for r in reps if r.state != FENCED])
    result["resumed"] = resumed["replicas"]
    return result


async def _roll_back(router: Router, reps: list[Replica], before: dict[str, dict], timeout_s: float) -> dict:
    bodies = {}
    for r in reps:
        old = before[r.url]
        if old.get("path") is None:
            router.replicas.fence(r, "updated while another replica failed, and its previous checkpoint is unknown")
            continue
        bodies[r.url] = {"path": old["path"], "version": old.get("version")}
    todo = [r for r in reps if r.url in bodies]
    back = await fan_out(router, "POST", "/v1/update_weights", None, timeout_s, todo, bodies)
    for r in todo:
        if "error" in back["replicas"][r.url]:
            router.replicas.fence(r, f"rollback to {bodies[r.url]} failed: {back['replicas'][r.url]['error']}")
    return {r.url: back["replicas"].get(r.url, {"error": r.reason}) for r in reps}


def _live(router: Router) -> list[Replica]:
    return [r for r in router.replicas.replicas.values() if r.state not in (DOWN, FENCED)]


async def staged_update(router: Router, path: str, body: dict, timeout_s: float) -> dict:
    """Stage on all (commit=false) → commit on all, or abort the staged copies on all. A caller
    that asked for commit=false itself (a transactional trainer) gets the staged state held on
    every replica, for its own /v1/commit_weights or /v1/abort_staged through the router."""
    reps = _live(router)
    staged = await fan_out(router, "POST", path, {**body, "commit": False}, timeout_s, reps)
    if not staged["ok"]:
        aborted = await fan_out(router, "POST", "/v1/abort_staged", {}, timeout_s, reps)
        return {"ok": False, "phase": "stage", "replicas": staged["replicas"], "aborted": aborted["replicas"]}
    if body.get("commit", True) is False:
        return {"ok": True, "phase": "stage", "staged": True, "replicas": staged["replicas"]}
    return await commit_all(router, body.get("version"), timeout_s, reps)


async def commit_all(router: Router, version: int | None, timeout_s: float, reps: list[Replica] | None = None) -> dict:
    """Commit the staged version on every replica; one that fails at commit is fenced."""
    reps = _live(router) if reps is None else reps
    committed = await fan_out(
        router, "POST", "/v1/commit_weights", {} if version is None else {"version": version}, timeout_s, reps
    )
    for r in reps:
        res = committed["replicas"][r.url]
        if "error" in res:
            router.replicas.fence(r, f"weight commit failed: {res['error']}")
            await call(router, r, "POST", "/v1/fence", {"reason": "weight commit failed on this replica"}, timeout_s)
        else:
            r.weights = {**r.weights, "version": res.get("weight_version", version)}
    return {"ok": committed["ok"], "phase": "commit", "replicas": committed["replicas"]}
