"""A request through the router (a Flight): it survives its replica.

Every generation request goes upstream as a stream with token ids on, whatever the client asked,
so the router always holds each sample's tokens so far. When the replica is drained or its
connection fails, every unfinished sample continues on another replica as one `/generate` stream
over prompt + tokens so far, with `max_tokens` reduced by what was produced and the same sampling
parameters; the router converts those events back into the client's surface. The client sees one
stream: the router forwards each token once, and nothing the router had not forwarded was lost
(a greedy continuation regenerates it).

A request that moves before anything reached the client is re-sent whole to another replica (so
prompt logprobs, echo and seeds are exact); continuation.py says what a continuation keeps.

One job past 400 lines: a request's life through the router on every surface, including moving it
between replicas mid-stream."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from tidal.router.continuation import continuation_body, prior_output_tokens, sampling_state
from tidal.router.replicas import NoReplica, Replica, prefix_key
from tidal.router.upstream import Reply, UpstreamError

if TYPE_CHECKING:
    from tidal.router.app import Router

SURFACES = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/generate": "generate"}
_PREFIX = {"completions": "cmpl", "chat": "chatcmpl", "generate": "gen"}
_ROUTER_FIELDS = ("token_ids", "weight_version", "weight_spans", "prompt_token_ids")
MAX_SEGMENTS = 16


class UpstreamRejected(Exception):
    """The first replica refused the request (4xx/5xx): the client gets that reply as-is."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(status)
        self.status, self.body, self.content_type = status, body, content_type


@dataclass(slots=True)
class Sample:
    index: int
    prompt_index: int
    in_prompt: int  # its place among its prompt's n samples (the engine derives its seed from it)
    tokens: list[int] = field(default_factory=list)
    spans: list[list[int]] = field(default_factory=list)  # [version, start, end] over tokens
    finish: str | None = None
    started: bool = False  # chat: the role delta went out
    moved_at: list[int] = field(default_factory=list)  # token counts at which it changed replica

    def add(self, ids: list[int], version: int | None) -> None:
        if ids and version is not None:
            n = len(self.tokens)
            if self.spans and self.spans[-1][0] == version and self.spans[-1][2] == n:
                self.spans[-1][2] = n + len(ids)
            else:
                self.spans.append([version, n, n + len(ids)])
        self.tokens += ids


class Flight:
    """One client request: its samples, the replica serving them now, and the upstream streams."""

    def __init__(self, router: Router, path: str, body: dict, session: str | None) -> None:
        self.router, self.path, self.body, self.session = router, path, body, session
        self.surface = SURFACES[path]
        given = body.get("request_id") or body.get("rid")
        self.rid_list = given if isinstance(given, list) and given and all(isinstance(r, str) for r in given) else None
        # an id of another type goes upstream as given: the replica refuses it, naming the field
        self.own_rid = self.rid_list is None and (given is None or isinstance(given, str))
        named = self.rid_list[0] if self.rid_list else given if isinstance(given, str) else None
        self.rid = named or f"{_PREFIX[self.surface]}-{uuid.uuid4().hex[:16]}"
        self.batch = self.surface == "generate" and _generate_batch(body)
        ns = _samples_per_prompt(self.surface, body)
        self.num_prompts = len(ns)
        self.prompt_rids = self.rid_list or ([f"{self.rid}-{p}" for p in range(len(ns))] if self.batch else [self.rid])
        self.samples: dict[int, Sample] = {}
        for p, n in enumerate(ns):  # prompt-major, as every surface numbers its samples
            first = len(self.samples)
            self.samples.update((first + i, Sample(first + i, p, i)) for i in range(n))
        self.incremental = self.surface != "generate" or body.get("incremental_streaming_output") is True
        self._folded: dict[int, dict] = {}  # /generate streamed cumulatively: each sample's output so far
        self.wants_ids = bool(body.get("return_token_ids")) or self.surface == "generate"
        self.wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.prompt_ids: list[list[int]] | None = _known_prompt_ids(self.surface, body)
        self.prompt_tokens: int | None = None
        self.created, self.model = int(time.time()), body.get("model")
        self.replica: Replica | None = None
        self.streaming = body.get("stream") is True
        self.moving = False
        self.delivered = False  # an event went to the client (or the reply being assembled)
        self.moves = 0
        self._weight = 0
        self.upstream_ids: list[str] = []
        self._pumps: list[asyncio.Task] = []
        self._queue: asyncio.Queue | None = None
        self._first: Reply | None = None
        self._direct: Reply | None = None  # the stream `_read` reads now
        self._failure: str | None = None  # why the segment's upstream failed

    @property
    def weight(self) -> int:
        return sum(1 for s in self.samples.values() if s.finish is None)

    def unfinished(self) -> list[Sample]:
        return [s for s in self.samples.values() if s.finish is None]

    # -- the first segment: opened before the client's response starts, so refusals keep their status
    async def open(self) -> None:
        tried: set[str] = set()
        while True:
            rep = self.router.replicas.pick(
                self.session, prefix_key(_prompt_of(self.surface, self.body)), exclude=frozenset(tried)
            )
            body = {**self.body, "stream": True}
            if self.own_rid:
                body.pop("rid", None)
                body["request_id"] = self.rid
            if self.surface == "generate":  # the router reads each event's new tokens (SGLang's incremental form)
                body["incremental_streaming_output"] = True
            else:
                body.update(return_token_ids=True, stream_options={"include_usage": True})
            self._attach(rep, list(self.rid_list or [self.rid] + [f"{self.rid}-{i}" for i in range(self.num_prompts)]))
            try:
                resp = await self._send(rep, self.path, body)
                if resp.status != 200:
                    data = await resp.read()
                    await resp.aclose()
                    self._release()
                    raise UpstreamRejected(resp.status, data, resp.headers.get("content-type", "application/json"))
            except UpstreamError as e:
                self._release()
                self.router.replicas.mark_down(rep, str(e))
                tried.add(rep.url)
                continue
            self._first = resp
            return

    async def _send(self, rep: Replica, path: str, body: dict) -> Reply:
        return await self.router.upstream.post(rep.url, path, _encode(body))

    def _attach(self, rep: Replica, upstream_ids: list[str]) -> None:
        self.replica, self.upstream_ids, self._weight = rep, upstream_ids, self.weight
        rep.outstanding += self._weight
        rep.flights.add(self.rid)
        self.router.flights[self.rid] = self

    def _release(self) -> None:
        rep, self.replica = self.replica, None
        if rep is not None:
            rep.outstanding -= self._weight
            rep.leave(self.rid)
        self._weight = 0

    # -- events in the client's surface ------------------------------------------------------
    async def events(self) -> AsyncGenerator[list[dict | bytes], None]:
        """Every event the client should see, in its surface's shape, ending each sample once; a
        list at a time (what one upstream read brought). bytes: an upstream event forwarded as-is."""
        try:
            segment = 0
            while self.unfinished() and segment < MAX_SEGMENTS:
                if segment > 0 and not await self._replace():
                    break
                async for ev in self._run_segment(segment):
                    self.delivered = True
                    yield ev
                segment += 1
            for s in self.unfinished():  # no replica left: end with what the client already has
                s.finish = "abort"
                yield [self._final_abort(s)]
        finally:
            self._stop_pumps()
            self._release()
            self.router.flights.pop(self.rid, None)

    async def _replace(self) -> bool:
        """Where the flight goes on after a move: re-sent whole while the client has nothing yet,
        else each unfinished sample continues from its tokens. False: no replica is left."""
        self._release()
        self.moving = False
        if self.delivered:
            return await self._place_continuation()
        try:
            await self.open()
        except (NoReplica, UpstreamRejected) as e:
            self.router.log.warning("%s: could not re-send the request: %s", self.rid, e)
            return False
        self.moves += 1
        for s in self.unfinished():  # it changed replica at 0 tokens, as its final event says
            s.moved_at.append(0)
        return True

    async def _place_continuation(self) -> bool:
        self._release()
        try:
            rep = self.router.replicas.pick()
        except NoReplica:
            return False
        self._attach(rep, [])
        if self.prompt_ids is None:
            try:
                self.prompt_ids = await self._resolve_prompt_ids(rep)
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
                self.router.log.warning("%s: could not read the prompt's token ids from %s: %s", self.rid, rep.url, e)
                self.router.replicas.mark_down(rep, f"prompt token ids: {e}")
                return await self._place_continuation()
        self.moves += 1
        for s in self.unfinished():
            s.moved_at.append(len(s.tokens))
        return True

    async def _run_segment(self, segment: int) -> AsyncGenerator[list[dict | bytes], None]:
        rep = self.replica
        assert rep is not None
        self._failure = None
        if self._first is not None:  # the whole request, first sent or re-sent: one stream, read right here
            self._direct, self._first = self._first, None
            batches = self._read(self._direct)
        else:
            batches = self._read_pumps(segment, rep)
        try:
            async for out in batches:
                yield out
        finally:
            await batches.aclose()
        self._stop_pumps()
        failure = self._failure
        if failure is not None and not self.moving:
            self.router.log.warning(
                "%s: replica %s failed mid-request (%s); continuing elsewhere", self.rid, rep.url, failure
            )
            if failure.startswith("connection"):
                self.router.replicas.mark_down(rep, failure)

    async def _read(self, resp: Reply) -> AsyncGenerator[list[dict | bytes], None]:
        """One upstream stream read in the flight's own task: client events per socket read. No
        pump task and queue between (they were a task wake-up per event); `move` interrupts the
        reply to stop it, and what was read before is forwarded as with the queue."""
        try:
            if self.moving:
                return
            async for payloads in resp.events():
                if self.moving:  # what was read after `move` stays unforwarded: a continuation regenerates it
                    return
                out: list[dict | bytes] = []
                for data in payloads:
                    obj = _decode(data)
                    if "error" in obj:
                        self._failure = f"upstream error: {obj['error']}"
                        return
                    out += self._absorb(None, (obj, data))
                if out:
                    yield out
        except UpstreamError as e:
            self._failure = f"connection: {e}"
        except (ValueError, msgspec.DecodeError) as e:
            self._failure = f"bad upstream event: {e}"
        finally:
            self._direct = None
            await resp.aclose()

    async def _read_pumps(self, segment: int, rep: Replica) -> AsyncGenerator[list[dict | bytes], None]:
        """A continuation stream per unfinished sample, each read by a pump task into one queue."""
        queue: asyncio.Queue = asyncio.Queue()
        self._queue = queue
        if self.moving:  # drained while this segment was being placed
            queue.put_nowait(("moved", None, None))
        self._pumps = []
        for s in self.unfinished():
            rid = f"{self.rid}.m{segment}.{s.index}"
            self.upstream_ids.append(rid)
            self._pumps.append(
                asyncio.get_running_loop().create_task(
                    self._pump(queue, s, None, (rep, self._continuation_body(s, rid, rep)))
                )
            )
        live, moved = len(self._pumps), False
        while live and not moved:
            out: list[dict | bytes] = []
            item = await queue.get()
            while True:  # what else is queued goes out with it: one send to the client, not several
                kind, sample, payload = item
                if kind == "events":
                    out += [ev for raw in payload for ev in self._absorb(sample, raw)]
                elif kind == "moved":
                    moved = True
                    break
                else:
                    live -= 1
                    if kind == "fail" and self._failure is None:
                        self._failure = payload
                if queue.empty():
                    break
                item = queue.get_nowait()
            if out:
                yield out

    async def _pump(
        self, queue: asyncio.Queue, sample: Sample | None, resp: Reply | None, request: tuple[Replica, dict] | None
    ) -> None:
        """Upstream events into `queue`, a batch per socket read: ("events", sample, [(obj, raw)])."""
        try:
            if resp is None:
                if request is None:
                    raise ValueError("_pump: expected an open response or a request to send")
                rep, body = request
                resp = await self._send(rep, "/generate", body)
                if resp.status != 200:
                    text = (await resp.read())[:300]
                    queue.put_nowait(("fail", sample, f"status {resp.status}: {text!r}"))
                    return
            async for payloads in resp.events():
                batch = []
                for data in payloads:
                    obj = _decode(data)
                    if "error" in obj:
                        queue.put_nowait(("fail", sample, f"upstream error: {obj['error']}"))
                        return
                    batch.append((obj, data))
                queue.put_nowait(("events", sample, batch))
            queue.put_nowait(("end", sample, None))
        except UpstreamError as e:
            queue.put_nowait(("fail", sample, f"connection: {e}"))
        except (ValueError, msgspec.DecodeError) as e:
            queue.put_nowait(("fail", sample, f"bad upstream event: {e}"))
        finally:
            if resp is not None:
                await resp.aclose()

    def _stop_pumps(self) -> None:
        for t in self._pumps:
            t.cancel()
        self._pumps = []
        if self._first is not None:
            asyncio.get_running_loop().create_task(self._first.aclose())
            self._first = None

    def move(self) -> None:
        """Drain: stop reading from this replica; `events` continues the samples elsewhere."""
        self.moving = True
        if self._queue is not None:
            self._queue.put_nowait(("moved", None, None))
        if self._direct is not None:
            self._direct.interrupt()  # wakes `_read`, which stops there

    # -- upstream event -> client event ------------------------------------------------------
    def _absorb(self, cont: Sample | None, event: tuple[dict, bytes]) -> list[dict | bytes]:
        """Client events for one upstream event; the upstream's own text when it can go as-is."""
        obj, raw = event
        if cont is not None:
            return self._absorb_continuation(cont, obj)
        if self.surface == "generate":
            s = self.samples[int(obj.get("index", 0))]
            s.add(obj.get("output_ids") or [], obj.get("weight_version"))
            s.finish = obj.get("finish_reason")
            self.prompt_tokens = obj.get("prompt_tokens", self.prompt_tokens)
            if self.streaming and self.incremental and s.finish is None:
                return [raw]
            return [self._generate_event(s, {**obj, **self._spans_if_final(s)})]
        self.model = obj.get("model", self.model)
        self.created = obj.get("created", self.created)
        if not obj.get("choices"):
            usage = obj.get("usage") or {}
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            return []
        out: list[dict | bytes] = []
        for c in obj["choices"]:
            s = self.samples[int(c["index"])]
            s.add(c.get("token_ids") or [], c.get("weight_version"))
            if self.surface == "chat" and "role" in (c.get("delta") or {}):
                if s.started:
                    continue
                s.started = True
            s.finish = c.get("finish_reason")
            if self.streaming and self.wants_ids and s.finish is None and len(obj["choices"]) == 1:
                out.append(raw)
                continue
            c = c if self.wants_ids else {k: v for k, v in c.items() if k not in _ROUTER_FIELDS}
            out.append({**obj, "choices": [{**c, **self._spans_if_final(s)}]})
        return out

    def _spans_if_final(self, s: Sample) -> dict:
        if s.finish is None or not self.wants_ids:
            return {}
        return {"weight_spans": [list(x) for x in s.spans], "moved_at": list(s.moved_at)}

    def _absorb_continuation(self, s: Sample, obj: dict) -> list[dict | bytes]:
        ids = obj.get("output_ids") or []
        s.add(ids, obj.get("weight_version"))
        s.finish = obj.get("finish_reason")
        text, lps = obj.get("text") or "", obj.get("output_logprobs")
        if self.surface == "generate":
            prompt_tokens = len(self._prompt(s))
            ev = {
                **obj,
                "index": s.index,
                "completion_tokens": len(s.tokens),
                "prompt_tokens": prompt_tokens,
                **self._spans_if_final(s),
            }
            if isinstance(obj.get("meta_info"), dict):  # SGLang's view: the sample's, not the continuation's
                meta = {**obj["meta_info"], "prompt_tokens": prompt_tokens, "completion_tokens": len(s.tokens)}
                if "weight_spans" in ev:
                    meta["weight_spans"] = ev["weight_spans"]
                if (meta.get("finish_reason") or {}).get("type") == "length":
                    meta["finish_reason"] = {"type": "length", "length": len(s.tokens)}
                ev["meta_info"] = meta
            return [self._generate_event(s, ev)]
        if not ids and not text and s.finish is None:
            return []
        choice: dict[str, Any] = {"index": s.index, "finish_reason": s.finish}
        if self.surface == "chat":
            choice["delta"] = {"content": text} if (text or s.finish is None) else {}
            choice["logprobs"] = None
            if self.body.get("logprobs") and lps is not None:
                choice["logprobs"] = {
                    "content": [
                        {"token": f"token_id:{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
                        for t, lp in zip(ids, lps)
                    ]
                }
        else:
            choice["text"] = text
            choice["logprobs"] = None
            if self.body.get("logprobs") is not None and lps is not None:
                top = obj.get("output_top_logprobs")
                choice["logprobs"] = {
                    "tokens": [f"token_id:{t}" for t in ids],
                    "token_logprobs": lps,
                    "top_logprobs": top,
                    "text_offset": None,
                }
        if s.finish is not None:
            choice["stop_reason"] = obj.get("stop_reason")
        if self.wants_ids:
            choice.update(token_ids=ids, weight_version=obj.get("weight_version"), **self._spans_if_final(s))
        obj_name = "chat.completion.chunk" if self.surface == "chat" else "text_completion"
        return [{"id": self.rid, "object": obj_name, "created": self.created, "model": self.model, "choices": [choice]}]

    def _generate_event(self, s: Sample, ev: dict) -> dict:
        """A /generate event in the client's form: incremental as read, or the sample's output so
        far (SGLang's default cumulative stream); the sample's own request id in both."""
        rid = self.prompt_rids[s.prompt_index]
        ev = {**ev, "request_id": rid}
        if isinstance(ev.get("meta_info"), dict):
            ev["meta_info"] = {**ev["meta_info"], "id": rid}
        if not self.streaming or self.incremental:
            return ev
        acc = self._folded[s.index] = fold_generate(self._folded.get(s.index), ev)
        return {**acc, "text": acc["text"], "output_ids": list(acc["output_ids"]), "completion_tokens": len(s.tokens)}

    def _final_abort(self, s: Sample) -> dict:
        if self.surface == "generate":
            return self._generate_event(
                s,
                {
                    "index": s.index,
                    "output_ids": [],
                    "text": "",
                    "output_logprobs": [] if self.body.get("return_logprob", True) else None,
                    "finish_reason": "abort",
                    "stop_reason": None,
                    "weight_version": None,
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": len(s.tokens),
                    "weight_spans": [list(x) for x in s.spans],
                    "meta_info": {
                        "finish_reason": {"type": "abort", "message": "no replica is left"},
                        "prompt_tokens": self.prompt_tokens,
                        "completion_tokens": len(s.tokens),
                        "weight_spans": [list(x) for x in s.spans],
                    },
                },
            )
        choice: dict[str, Any] = {"index": s.index, "logprobs": None, "finish_reason": "abort", "stop_reason": None}
        if self.surface == "chat":
            choice["delta"] = {}
        else:
            choice["text"] = ""
        if self.wants_ids:
            choice.update(token_ids=[], weight_spans=[list(x) for x in s.spans])
        return {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.surface == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def usage(self) -> dict:
        prompt = self.prompt_tokens
        if prompt is None and self.prompt_ids is not None:
            prompt = sum(len(p) for p in self.prompt_ids) * 1
        prompt = prompt or 0
        comp = sum(len(s.tokens) for s in self.samples.values())
        return {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp}

    # -- continuation ------------------------------------------------------------------------
    async def _resolve_prompt_ids(self, rep: Replica) -> list[list[int]]:
        """The prompt's token ids as the replicas tokenize it: a 1-token non-streaming request."""
        if self.surface == "generate":
            path, body = (
                "/v1/completions",
                {
                    "prompt": self.body["text"],
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "return_token_ids": True,
                    "model": None,
                },
            )
        else:
            path = self.path
            body = {
                **self.body,
                "stream": False,
                "stream_options": None,
                "n": 1,
                "max_tokens": 1,
                "min_tokens": 0,
                "return_token_ids": True,
                "request_id": f"{self.rid}.prompt",
            }
            body.pop("max_completion_tokens", None)
            body.pop("best_of", None)
        r = await self.router.http.post(rep.url + path, json=body, headers=self.router.upstream_headers)
        r.raise_for_status()
        data = r.json()
        if self.surface == "chat":
            return [data["prompt_token_ids"]]
        return [c["prompt_token_ids"] for c in sorted(data["choices"], key=lambda c: c["index"])]

    def _prompt(self, s: Sample) -> list[int]:
        if self.prompt_ids is None:
            raise ValueError("a continuation needs the prompt's token ids, which are not known yet")
        return self.prompt_ids[s.prompt_index]

    def _continuation_body(self, s: Sample, rid: str, rep: Replica) -> dict:
        prompt = self._prompt(s)
        state = sampling_state(self.surface, self.body, s.prompt_index, len(prompt), rep.weights.get("max_model_len"))
        prior = prior_output_tokens(self.surface, self.body, s.prompt_index)
        return continuation_body(state, prompt + s.tokens, len(s.tokens), s.in_prompt, rid, prior)


_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def fold_generate(acc: dict | None, ev: dict) -> dict:
    """One sample's /generate output so far, with its next incremental event added."""
    if acc is None:
        acc = {
            "request_id": ev.get("request_id"),
            "index": ev.get("index", 0),
            "output_ids": [],
            "text": "",
            "output_logprobs": None,
        }
    acc["output_ids"] = acc["output_ids"] + (ev.get("output_ids") or [])
    acc["text"] += ev.get("text") or ""
    if ev.get("output_logprobs") is not None:
        acc["output_logprobs"] = (acc["output_logprobs"] or []) + ev["output_logprobs"]
    if ev.get("output_top_logprobs") is not None:
        acc["output_top_logprobs"] = acc.get("output_top_logprobs", []) + ev["output_top_logprobs"]
    for k in (
        "request_id",
        "finish_reason",
        "stop_reason",
        "weight_version",
        "prompt_tokens",
        "completion_tokens",
        "weight_spans",
        "moved_at",
    ):
        if ev.get(k) is not None:
            acc[k] = ev[k]
    if ev.get("meta_info") is not None:  # SGLang's meta_info: the last one, its logprob lists joined
        meta = acc.get("meta_info") or {}
        joined = {
            k: meta.get(k, []) + ev["meta_info"][k]
            for k in ("output_token_logprobs", "output_top_logprobs")
            if ev["meta_info"].get(k) is not None
        }
        acc["meta_info"] = {**meta, **ev["meta_info"], **joined}
    return acc


def _generate_batch(body: dict) -> bool:
    text, ids = body.get("text"), body.get("input_ids")
    return isinstance(text, list) or (isinstance(ids, list) and bool(ids) and isinstance(ids[0], list))


def _samples_per_prompt(surface: str, body: dict) -> list[int]:
    """n of each prompt. A malformed body gets a layout that does not fail here: the replica
    refuses it with a 400 naming the field, which the client receives as-is."""
    if surface == "generate":
        prompts = body.get("text") if body.get("text") is not None else body.get("input_ids")
        count = len(prompts) if prompts is not None and _generate_batch(body) else 1  # a batch has its list
        sp = body.get("sampling_params") or {}
        each = sp if isinstance(sp, list) and len(sp) == count else [sp] * count
        return [_n(x.get("n") if isinstance(x, dict) else 1) for x in each]
    return [_n(body.get("n"))] * (_num_prompts(body) if surface == "completions" else 1)


def _n(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 128 else 1


def _num_prompts(body: dict) -> int:
    p = body.get("prompt")
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        return len(p)
    return 1


def _known_prompt_ids(surface: str, body: dict) -> list[list[int]] | None:
    if surface == "generate":
        ids = body.get("input_ids")
        if _generate_batch(body):
            return [list(x) for x in ids] if body.get("text") is None and isinstance(ids, list) else None
        return [list(ids)] if isinstance(ids, list) else None
    if surface == "completions":
        p = body.get("prompt")
        if isinstance(p, list) and p and isinstance(p[0], int):
            return [list(p)]
        if isinstance(p, list) and p and all(isinstance(x, list) for x in p):
            return [list(x) for x in p]
    return None


def _prompt_of(surface: str, body: dict) -> object:
    if surface == "generate":
        return body.get("input_ids") or body.get("text")
    if surface == "chat":
        msgs = body.get("messages") or []
        return json.dumps(msgs[:2], sort_keys=True) if msgs else None
    return body.get("prompt")
