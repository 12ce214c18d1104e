"""The router's HTTP app: one endpoint in front of N `tidal serve` replicas.

Generation (/v1/completions, /v1/chat/completions, /generate) runs as a Flight (migrate.py);
control calls fan out (control.py); replica admin: GET/POST/DELETE /v1/replicas,
POST /v1/replicas/drain; any other path is proxied as-is to one replica.

One job past 400 lines: the routes of every API surface the router passes through, plus its admin
and fan-out control routes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from tidal.router import control
from tidal.router.migrate import SURFACES, Flight, UpstreamRejected, fold_generate
from tidal.router.replicas import DRAINING, UP, NoReplica, ReplicaSet, normalise_url
from tidal.router.sse import EventStream
from tidal.router.upstream import Upstream
from tidal.server.mux import MUX_PATH

SESSION_HEADERS = ("x-session-id", "x-routing-key")
_HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive", "accept-encoding"}


@dataclass(slots=True)
class RouterSettings:
    replicas: list[str] = field(default_factory=list)
    api_key: str | None = None
    admin_key: str | None = None
    control_timeout_s: float = 60.0
    update_timeout_s: float = 600.0
    probe_interval_s: float = 0.5
    prefix_slack: int = 4
    channels: bool = True  # generation requests to a replica share its channel (channel.py)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_encode(obj), status_code=status, media_type="application/json")


def _error(status: int, message: str, param: str | None = None) -> Response:
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    return _json({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


class Router:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.log = logging.getLogger("tidal.router")
        key = settings.admin_key or settings.api_key
        self.upstream_headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.replicas = ReplicaSet(
            settings.probe_interval_s, prefix_slack=settings.prefix_slack, headers=self.upstream_headers
        )
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1024)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), limits=limits)
        self.upstream = Upstream(self.upstream_headers, channels=settings.channels)
        self.flights: dict[str, Flight] = {}

    async def start(self) -> None:
        for url in self.settings.replicas:
            await self.replicas.add(url)
        self.replicas.start()
        # What is loaded by now (FastAPI, pydantic, httpx) lives for good: out of the collector's
        # sight, so that the collections streaming triggers (it allocates per event) do not walk
        # it over and over (they were a fifth of the router's CPU at 128 streams).
        gc.freeze()

    async def stop(self) -> None:
        await self.replicas.close()
        await self.http.aclose()
        self.upstream.close()

    # -- auth ----------------------------------------------------------------------------
    def _check(self, request: Request, key: str | None) -> None:
        if key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong 'Authorization: Bearer KEY' header", "authorization")

    def check_user(self, request: Request) -> None:
        self._check(request, self.settings.api_key)

    def check_admin(self, request: Request) -> None:
        self._check(request, self.settings.admin_key or self.settings.api_key)

    # -- generation ----------------------------------------------------------------------
    async def generate(self, request: Request) -> Response:
        self.check_user(request)
        path = request.url.path
        body = await _body(request)
        stream = body.get("stream") is True
        session = next((request.headers[h] for h in SESSION_HEADERS if h in request.headers), None)
        flight = Flight(self, path, body, session)
        if flight.rid in self.flights:
            raise APIError(400, f"request_id={flight.rid!r} is already in flight", "request_id")
        try:
            await flight.open()
        except NoReplica as e:
            return _error(503, str(e))
        except UpstreamRejected as e:
            return Response(e.body, status_code=e.status, media_type=e.content_type)
        headers = {"x-tidal-replica": flight.replica.url if flight.replica else ""}
        if stream:
            return EventStream(self._sse(flight), headers)
        events = flight.events()
        try:
            # only streams forward an upstream's raw bytes: a reply assembled here holds dicts alone
            resp = _json(_aggregate(flight, cast("list[dict]", [ev async for batch in events for ev in batch])))
        finally:
            await events.aclose()
        resp.headers.update(headers)
        return resp

    async def _sse(self, flight: Flight) -> AsyncGenerator[tuple[bytes, bool], None]:
        """The client's stream, a chunk per batch of events (a burst of events costs one send), and
        whether it is the last: the final events go out with [DONE] as soon as every sample ended."""
        events = flight.events()
        try:
            ended = False
            async for batch in events:
                chunk = b"".join(b"data: " + (ev if isinstance(ev, bytes) else _encode(ev)) + b"\n\n" for ev in batch)
                if ended:  # nothing follows a sample's end on any surface; never sent after [DONE]
                    self.log.warning("%s: %d events after the stream ended, dropped", flight.rid, len(batch))
                elif not flight.unfinished() and not flight.wants_usage:
                    ended = True
                    yield chunk + b"data: [DONE]\n\n", True
                else:
                    yield chunk, False
            if ended:
                return
            tail = b""
            if flight.wants_usage and flight.surface != "generate":  # usage follows the upstream's own usage event
                last: dict[str, Any] = {
                    "id": flight.rid,
                    "object": _chunk_object(flight),
                    "created": flight.created,
                    "model": flight.model,
                    "choices": [],
                    "usage": flight.usage(),
                }
                tail = b"data: " + _encode(last) + b"\n\n"
            yield tail + b"data: [DONE]\n\n", True
        finally:
            await events.aclose()

    # -- control -------------------------------------------------------------------------
    async def fan_out(self, request: Request) -> Response:
        self.check_admin(request)
        path = request.url.path
        body = await _body(request, optional=True) if request.method == "POST" else None
        timeout = float((body or {}).get("timeout_s") or self.settings.control_timeout_s)
        if path == "/v1/pause":
            timeout += float((body or {}).get("timeout_s") or 0)  # a drain's own duration plus the reply
        bodies = control.abort_bodies(self, body) if path == "/v1/abort_requests" and body else None
        reply = await control.fan_out(self, request.method, path, body, timeout, bodies=bodies)
        return _json(reply, 200 if reply["ok"] else 502)

    async def update_weights(self, request: Request) -> Response:
        self.check_admin(request)
        body = await _body(request)
        if not isinstance(body.get("path"), str):
            raise APIError(400, f"path={body.get('path')!r}: expected a checkpoint directory string", "path")
        timeout = float(body.get("timeout_s") or self.settings.update_timeout_s)
        reply = await control.update_weights(self, body, timeout)
        return _json(reply, 200 if reply["ok"] else 502)

    async def staged_update(self, request: Request) -> Response:
        self.check_admin(request)
        body = await _body(request)
        timeout = float(body.get("timeout_s") or self.settings.update_timeout_s)
        reply = await control.staged_update(self, request.url.path, body, timeout)
        return _json(reply, 200 if reply["ok"] else 502)

    async def commit_weights(self, request: Request) -> Response:
        self.check_admin(request)
        body = await _body(request, optional=True)
        version = body.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 0):
            raise APIError(400, f"version={version!r}: expected a non-negative integer or null", "version")
        timeout = float(body.get("timeout_s") or self.settings.update_timeout_s)
        reply = await control.commit_all(self, version, timeout)
        return _json(reply, 200 if reply["ok"] else 502)

    async def health(self, request: Request) -> Response:
        reps = self.replicas.summary()
        up = sum(1 for r in reps.values() if r["state"] == UP)
        return _json({"status": "ok" if up else "unhealthy", "replicas_up": up, "replicas": reps}, 200 if up else 503)

    async def state(self, request: Request) -> Response:
        self.check_admin(request)
        reply = await control.fan_out(self, "GET", "/v1/state", None, self.settings.control_timeout_s)
        for url, res in reply["replicas"].items():
            res["router"] = self.replicas.replicas[url].summary()
        return _json({**reply, "in_flight": len(self.flights)}, 200 if reply["ok"] else 502)

    # -- replica admin -------------------------------------------------------------------
    async def list_replicas(self, request: Request) -> Response:
        self.check_admin(request)
        return _json({"replicas": self.replicas.summary()})

    async def add_replica(self, request: Request) -> Response:
        self.check_admin(request)
        url = _url(await _body(request))
        rep = await self.replicas.add(url)
        return _json({"url": rep.url, **rep.summary()})

    async def remove_replica(self, request: Request) -> Response:
        self.check_admin(request)
        url = _url(await _body(request))
        try:
            rep = self.replicas.get(url)
        except KeyError:
            raise APIError(404, f"url={url!r} is not a registered replica", "url") from None
        moved = await self._drain(rep, self.settings.control_timeout_s)
        self.replicas.remove(url)
        self.upstream.forget(url)
        return _json({"url": rep.url, "removed": True, **moved})

    async def drain(self, request: Request) -> Response:
        self.check_admin(request)
        body = await _body(request)
        url = _url(body)
        timeout = float(body.get("timeout_s") or self.settings.control_timeout_s)
        try:
            rep = self.replicas.get(url)
        except KeyError:
            raise APIError(404, f"url={url!r} is not a registered replica", "url") from None
        return _json({"url": rep.url, **await self._drain(rep, timeout)})

    async def _drain(self, rep, timeout_s: float) -> dict:
        """Out of routing; every flight on it moves to the others; returns when it serves none."""
        t0 = time.monotonic()
        rep.state, rep.reason = DRAINING, "drained by the admin API"
        ids = sorted(rep.flights)
        for rid in ids:
            f = self.flights.get(rid)
            if f is not None:
                f.move()
        upstream = [u for rid in ids if (f := self.flights.get(rid)) for u in f.upstream_ids]
        if upstream:
            await control.call(self, rep, "POST", "/v1/abort_requests", {"request_ids": upstream}, timeout_s)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(rep.idle(), max(0.0, t0 + timeout_s - time.monotonic()))
        return {"moved": ids, "left": sorted(rep.flights), "seconds": round(time.monotonic() - t0, 3)}

    async def undrain(self, request: Request) -> Response:
        self.check_admin(request)
        url = _url(await _body(request))
        rep = self.replicas.get(url)
        if rep.state == DRAINING:
            rep.state = "down"
        await self.replicas.probe(rep)
        return _json({"url": rep.url, **rep.summary()})

    # -- everything else -----------------------------------------------------------------
    async def proxy(self, request: Request) -> Response:
        try:
            rep = self.replicas.pick()
        except NoReplica as e:
            return _error(503, str(e))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        req = self.http.build_request(
            request.method,
            rep.url + request.url.path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )
        try:
            resp = await self.http.send(req, stream=True)
        except httpx.HTTPError as e:
            self.replicas.mark_down(rep, f"{type(e).__name__}: {e}")
            return _error(502, f"replica {rep.url} failed: {type(e).__name__}")
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS | {"content-encoding"}}

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        return StreamingResponse(body(), status_code=resp.status_code, headers=out_headers)


class _Front:
    """The generation routes go straight to the router, past FastAPI's middleware stack (five
    layers, each wrapping every send of every stream); everything else goes to the FastAPI app."""

    def __init__(self, app: FastAPI, router: Router) -> None:
        self.app, self.router, self.state = app, router, app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in SURFACES:
            try:
                response = await self.router.generate(Request(scope, receive))
            except APIError as e:
                response = _error(e.status, e.message, e.param)
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _no_channel() -> Response:
    return _error(404, f"the router offers no channel at {MUX_PATH}: its replicas do", "path")


def create_app(settings: RouterSettings) -> _Front:
    router = Router(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="Tidal router", lifespan=lifespan)
    app.state.router = router

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.param)

    for path in SURFACES:  # served by _Front; these answer what it passes on (a GET: 405)
        app.router.add_route(path, router.generate, methods=["POST"], include_in_schema=False)
    for path in control.FANOUT_POST:
        app.post(path)(router.fan_out)
    app.get("/v1/is_paused")(router.fan_out)
    app.get("/v1/state")(router.state)
    app.get("/health")(router.health)
    app.post("/v1/update_weights")(router.update_weights)
    for path in ("/v1/update_weights_from_distributed", "/v1/update_weights_from_shm", "/v1/update_weights_from_ipc"):
        app.post(path)(router.staged_update)
    app.post("/v1/commit_weights")(router.commit_weights)
    app.get("/v1/replicas")(router.list_replicas)
    app.post("/v1/replicas")(router.add_replica)
    app.delete("/v1/replicas")(router.remove_replica)
    app.post("/v1/replicas/drain")(router.drain)
    app.post("/v1/replicas/undrain")(router.undrain)
    app.post(MUX_PATH, include_in_schema=False)(_no_channel)  # not proxied: a router in front gets HTTP
    app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])(router.proxy)
    return _Front(app, router)


async def _body(request: Request, optional: bool = False) -> dict:
    raw = await request.body()
    if not raw and optional:
        return {}
    try:
        body = _decode(raw)
    except msgspec.DecodeError as e:
        raise APIError(400, f"body is not JSON: {e}", "body") from None
    if not isinstance(body, dict):
        raise APIError(400, f"body is a JSON {type(body).__name__}: expected an object", "body")
    return body


def _url(body: dict) -> str:
    url = body.get("url")
    if not isinstance(url, str):
        raise APIError(400, f"url={url!r}: expected a replica URL string", "url")
    try:
        return normalise_url(url)
    except ValueError as e:
        raise APIError(400, str(e), "url") from None


def _chunk_object(flight: Flight) -> str:
    return "chat.completion.chunk" if flight.surface == "chat" else "text_completion"


def _aggregate(flight: Flight, events: list[dict]) -> Any:
    """The non-streaming reply, assembled from the flight's client events."""
    if flight.surface == "generate":
        return _aggregate_generate(flight, events)
    choices: dict[int, dict] = {}
    head: dict[str, Any] = {}  # chat: the prompt's fields, on the first event
    for ev in events:
        for k in ("prompt_logprobs", "prompt_token_ids"):
            if ev.get(k) is not None and k not in head:
                head[k] = ev[k]
        for c in ev.get("choices", []):
            acc = choices.setdefault(c["index"], {"index": c["index"], "text": [], "lp": [], "ids": []})
            piece = c.get("text") if flight.surface == "completions" else (c.get("delta") or {}).get("content")
            acc["text"].append(piece or "")
            if c.get("logprobs"):
                acc["lp"].append(c["logprobs"])
            acc["ids"] += c.get("token_ids") or []
            for k in ("finish_reason", "stop_reason", "weight_version", "weight_spans", "moved_at"):
                if c.get(k) is not None:
                    acc[k] = c[k]
            if c.get("prompt_logprobs") is not None:
                acc["prompt_logprobs"] = c["prompt_logprobs"]
    out = []
    for idx in sorted(choices):
        acc = choices[idx]
        text = "".join(acc["text"])
        choice: dict[str, Any] = {
            "index": idx,
            "finish_reason": acc.get("finish_reason"),
            "stop_reason": acc.get("stop_reason"),
        }
        if flight.surface == "chat":
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = (
                {"content": [x for lp in acc["lp"] for x in lp.get("content") or []]}
                if flight.body.get("logprobs")
                else None
            )
        else:
            choice["text"] = text
            wants_lp = flight.body.get("logprobs") is not None
            choice["logprobs"] = _merge_completion_logprobs(acc["lp"]) if wants_lp else None
            if flight.body.get("prompt_logprobs") is not None:
                choice["prompt_logprobs"] = acc.get("prompt_logprobs")
        if flight.wants_ids:
            choice.update(
                token_ids=acc["ids"],
                weight_version=acc.get("weight_version"),
                weight_spans=acc.get("weight_spans"),
                moved_at=acc.get("moved_at", []),
            )
            if flight.surface == "completions" and flight.prompt_ids is not None:
                choice["prompt_token_ids"] = flight.prompt_ids[flight.samples[idx].prompt_index]
        out.append(choice)
    reply = {
        "id": flight.rid,
        "object": "chat.completion" if flight.surface == "chat" else "text_completion",
        "created": flight.created,
        "model": flight.model,
        "choices": out,
        "usage": flight.usage(),
    }
    if flight.surface == "chat":
        if flight.wants_ids:
            reply["prompt_token_ids"] = head.get("prompt_token_ids")
        if flight.body.get("prompt_logprobs") is not None:
            reply["prompt_logprobs"] = head.get("prompt_logprobs")
    return reply


def _merge_completion_logprobs(pieces: list[dict]) -> dict:
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": None, "text_offset": []}
    for p in pieces:
        out["tokens"] += p.get("tokens") or []
        out["token_logprobs"] += p.get("token_logprobs") or []
        if p.get("top_logprobs") is not None:
            out["top_logprobs"] = (out["top_logprobs"] or []) + p["top_logprobs"]
        out["text_offset"] += p.get("text_offset") or []
    return out


def _aggregate_generate(flight: Flight, events: list[dict]) -> Any:
    samples: dict[int, dict] = {}
    for ev in events:
        idx = ev.get("index", 0)
        samples[idx] = fold_generate(samples.get(idx), ev)
    out = []
    for idx in sorted(samples):
        acc = samples[idx]
        acc.setdefault("finish_reason", None)
        acc["completion_tokens"] = len(acc["output_ids"])
        if "meta_info" in acc:
            acc["meta_info"]["completion_tokens"] = len(acc["output_ids"])
        out.append(acc)
    return out if flight.batch or len(out) > 1 else out[0]
