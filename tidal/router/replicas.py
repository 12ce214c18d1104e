"""The replica set: membership, health probing and placement (least outstanding work, with affinity).

A replica is `up` (probed healthy), `down` (probe or upstream connection failed), `draining`
(its requests are being moved away) or `fenced` (failed a weight commit or rollback). Only an `up`
replica is routable. All state lives on the router's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import httpx

UP, DOWN, DRAINING, FENCED = "up", "down", "draining", "fenced"
PREFIX_TOKENS = 16  # the first block of token ids keys prefix-aware placement
PREFIX_CHARS = 64  # ... or the first characters of a text prompt
MAX_AFFINITY_KEYS = 100_000
MAX_SLOW_PROBES = 3  # timed-out probes in a row before a replica is taken out of routing

log = logging.getLogger("tidal.router")


class NoReplica(Exception):
    """No routable replica is left."""


@dataclass(slots=True)
class Replica:
    url: str
    state: str = DOWN
    outstanding: int = 0  # samples in flight (a request of n samples weighs n)
    reason: str | None = None  # why it is down or fenced
    weights: dict = field(default_factory=dict)  # {"path", "version"} the router last saw it serve
    last_ok: float = 0.0
    slow_probes: int = 0  # probes in a row that timed out
    flights: set = field(default_factory=set)  # request ids of the flights it serves now
    _idle: asyncio.Event | None = None

    def leave(self, rid: str) -> None:
        self.flights.discard(rid)
        if not self.flights and self._idle is not None:
            self._idle.set()

    async def idle(self) -> None:
        """Returns once no flight is on this replica."""
        if self.flights:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()

    def summary(self) -> dict:
        return {
            "state": self.state,
            "outstanding": self.outstanding,
            "reason": self.reason,
            "weight_version": self.weights.get("version"),
            "in_flight": len(self.flights),
        }


def prefix_key(prompt: object) -> str | None:
    """Hash of the first block of a prompt (token ids or text); None when there is no prompt."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        raw = ",".join(map(str, prompt[:PREFIX_TOKENS])).encode()
    elif isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        raw = prompt[0][:PREFIX_CHARS].encode()
    elif isinstance(prompt, str) and prompt:
        raw = prompt[:PREFIX_CHARS].encode()
    else:
        return None
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


class _Lru(OrderedDict):
    def put(self, key: str, value: str) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > MAX_AFFINITY_KEYS:
            self.popitem(last=False)


class ReplicaSet:
    """Replicas by URL, a probe loop, and `pick`: session key → prefix → least outstanding."""

    def __init__(
        self,
        probe_interval_s: float = 0.5,
        probe_timeout_s: float = 2.0,
        prefix_slack: int = 4,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.replicas: dict[str, Replica] = {}
        self.probe_interval_s, self.probe_timeout_s = probe_interval_s, probe_timeout_s
        self.prefix_slack = prefix_slack
        self.sessions, self.prefixes = _Lru(), _Lru()
        self.http = httpx.AsyncClient(timeout=probe_timeout_s, headers=headers or {})
        self._probe_task: asyncio.Task | None = None
        self._turn = 0

    # -- membership ----------------------------------------------------------------------
    async def add(self, url: str) -> Replica:
        url = normalise_url(url)
        rep = self.replicas.get(url) or Replica(url)
        if rep.state == FENCED:  # re-registering a fenced replica is how an operator clears the fence
            rep.state, rep.reason = DOWN, None
        self.replicas[url] = rep
        await self.probe(rep)
        if rep.state == UP and not rep.weights:
            await self.read_weights(rep)
        return rep

    def remove(self, url: str) -> Replica:
        url = normalise_url(url)
        if url not in self.replicas:
            raise KeyError(url)
        return self.replicas.pop(url)

    def get(self, url: str) -> Replica:
        url = normalise_url(url)
        if url not in self.replicas:
            raise KeyError(url)
        return self.replicas[url]

    # -- health --------------------------------------------------------------------------
    def start(self) -> None:
        self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        await self.http.aclose()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.probe(r) for r in list(self.replicas.values())))
            await asyncio.sleep(self.probe_interval_s)

    async def probe(self, rep: Replica) -> None:
        slow = False
        try:
            r = await self.http.get(rep.url + "/health")
            ok = r.status_code == 200
            reason = None if ok else f"/health {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            ok, reason = False, f"{type(e).__name__}: {e}"
            slow = isinstance(e, httpx.TimeoutException)
        if rep.state in (FENCED, DRAINING):
            return
        if ok:
            rep.last_ok, rep.slow_probes = time.monotonic(), 0
            if rep.state == DOWN and not rep.weights:
                await self.read_weights(rep)
            if rep.state != UP:
                log.info("replica %s is up", rep.url)
            rep.state, rep.reason = UP, None
            return
        # A busy replica on a loaded host can miss a probe deadline while it serves well: it stays
        # routable for a few slow probes; a refused connection or an error status takes it out now.
        rep.slow_probes = rep.slow_probes + 1 if slow else MAX_SLOW_PROBES
        if rep.state == UP and rep.slow_probes < MAX_SLOW_PROBES:
            return
        if rep.state == UP:
            log.warning("replica %s is down: %s", rep.url, reason)
        rep.state, rep.reason = DOWN, reason

    def mark_down(self, rep: Replica, reason: str) -> None:
        """An upstream connection failed: stop routing to it now; the probe brings it back."""
        if rep.state == UP:
            log.warning("replica %s is down: %s", rep.url, reason)
            rep.state, rep.reason = DOWN, reason

    def fence(self, rep: Replica, reason: str) -> None:
        rep.state, rep.reason = FENCED, reason

    async def read_weights(self, rep: Replica) -> None:
        """The checkpoint a replica serves (for rolling back a failed fleet update)."""
        try:
            models = (await self.http.get(rep.url + "/v1/models")).json()
            state = (await self.http.get(rep.url + "/v1/state")).json()
            model = models["data"][0]
            rep.weights = {
                "path": model.get("root"),
                "version": state.get("weight_version"),
                "max_model_len": model.get("max_model_len"),
            }
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            pass

    # -- placement -----------------------------------------------------------------------
    def routable(self, exclude: frozenset[str] = frozenset()) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state == UP and r.url not in exclude]

    def pick(
        self, session: str | None = None, prefix: str | None = None, exclude: frozenset[str] = frozenset()
    ) -> Replica:
        live = self.routable(exclude)
        if not live:
            raise NoReplica("no replica is up" + (f" (excluding {sorted(exclude)})" if exclude else ""))
        by_url = {r.url: r for r in live}
        if session is not None and session in self.sessions and self.sessions[session] in by_url:
            return by_url[self.sessions[session]]
        least = min(r.outstanding for r in live)
        choice = None
        if prefix is not None and prefix in self.prefixes:
            pref = by_url.get(self.prefixes[prefix])
            if pref is not None and pref.outstanding <= least + self.prefix_slack:
                choice = pref
        if choice is None:
            ties = [r for r in live if r.outstanding == least]
            self._turn += 1
            choice = ties[self._turn % len(ties)]
        if session is not None:
            self.sessions.put(session, choice.url)
        if prefix is not None:
            self.prefixes.put(prefix, choice.url)
        return choice

    def summary(self) -> dict:
        return {url: r.summary() for url, r in self.replicas.items()}


def normalise_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"url={url!r}: expected http://HOST:PORT or https://HOST:PORT")
    return url
