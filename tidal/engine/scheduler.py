"""Continuous batching under a token budget, chunked prefill, preemption by recompute.

Each step first serves running requests (decodes and unfinished chunked prefills, oldest
first), preempting the newest running request when blocks run out, then admits waiting
requests while the token budget, `max_num_seqs` and the KV pool allow. A preempted request
frees its blocks but keeps its generated tokens; it is re-prefilled (prompt + outputs) on
re-admission, so it finishes with the output it would have had.

Overlap scheduling: `schedule(lookahead=True)` builds step N+1 while step N is still on the device.
`advance` (at launch) moves every row's computed-token count forward and gives each sampling row a
placeholder token; `resolve` (when the sampled tokens are back) fills the placeholders, registers
full blocks in the prefix cache and checks stops. A lookahead schedule never preempts (a victim may
hold a placeholder) and skips requests that step N ends by length; when it runs out of blocks it
returns what it has with `needs_sync` set, and the next schedule runs after step N is resolved.
"""

from __future__ import annotations

from collections import deque

from tidal.config import EngineConfig
from tidal.engine.kv_cache import BlockManager
from tidal.engine.request import Request, RequestStatus
from tidal.engine.stop import check_stop
from tidal.runner.batch import PromptLogprobs, SampledToken, ScheduledBatch  # noqa: F401 (SampledToken: re-exported)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.bm = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queues --------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def live_requests(self) -> list[Request]:
        """Every unfinished request, pending n-sample forks included."""
        out: list[Request] = []
        for req in list(self.running) + list(self.waiting):
            out.append(req)
            out.extend(req.pending_forks)
        return out

    # -- one step ------------------------------------------------------------------------
    def schedule(self, admit: bool = True, lookahead: bool = False) -> ScheduledBatch:
        """The next step's rows. lookahead: the previous step is still in flight (see module doc)."""
        batch: ScheduledBatch[Request] = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            i += 1
            if lookahead and (
                req.num_computed_tokens >= req.num_tokens
                or (req.num_output_tokens and req.ends_by_length(req.num_output_tokens))
            ):
                continue  # the step in flight ends it (a scoring request's last chunk, or its length)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if lookahead:
                if not self.bm.allocate_slots(req, n, batch.blocks_to_copy):
                    batch.needs_sync = True
                    return batch
            else:
                while not self.bm.allocate_slots(req, n, batch.blocks_to_copy):
                    victim = self.running[-1]
                    self.preempt(victim)
                    preempted = True
                    if victim is req:
                        break
                if req.status is not RequestStatus.RUNNING:
                    break
            self._add_row(batch, req, n)
            budget -= n

        while admit and not preempted and self.waiting and budget > 0:
            req = self.waiting[0]
            if len(self.running) + 1 + len(req.pending_forks) > self.max_num_seqs:
                break
            hits = self.bm.get_computed_blocks(req)
            n = min(req.num_tokens - len(hits) * self.bm.block_size, budget)
            if not self.bm.allocate_slots(req, n, batch.blocks_to_copy, hits, admit=True):
                break
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = len(hits) * self.bm.block_size
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            self._add_row(batch, req, n)
            budget -= n
        return batch

    def _add_row(self, batch: ScheduledBatch, req: Request, n: int) -> None:
        batch.reqs.append(req)
        batch.num_new_tokens.append(n)
        done = req.num_computed_tokens + n == req.num_tokens
        if done and req.scoring_only:
            batch.scored.append(req)
        batch.sample_for.append([req, *req.pending_forks] if done and not req.scoring_only else [])

    def advance(self, batch: ScheduledBatch, step: int) -> None:
        """At launch: count the rows' tokens as computed and give each row that samples a
        placeholder for its token (forks get theirs in `resolve`, when they are created)."""
        row = 0
        for req, n, group in zip(batch.reqs, batch.num_new_tokens, batch.sample_for):
            req.num_computed_tokens += n
            if group:
                req.append_placeholder(row, step)
                row += len(group)

    def resolve(
        self,
        batch: ScheduledBatch,
        sampled: list[SampledToken],
        weight_version: int,
        prompt: dict[int, PromptLogprobs] | None = None,
    ) -> list[Request]:
        """When the step's tokens are back: record prompt logprobs, fill the placeholders, fork
        n-sample prompts, cache full blocks, check stops (tidal/engine/stop.py), end scoring requests
        whose prompt is done ("length"). Returns the requests that got a token or ended (finished
        ones included). Rows of requests that ended while the step was in flight are dropped."""
        touched: list[Request] = []
        for b, chunk in (prompt or {}).items():
            req = batch.reqs[b]
            if not req.finished:
                req.add_prompt_logprobs(chunk.logprobs, chunk.ranks, chunk.top_logprobs)
        it = iter(sampled)
        for req, group in zip(batch.reqs, batch.sample_for):
            if not group:
                continue  # mid-way through a chunked prefill: nothing sampled, forks still wait
            for target in group:
                tok = next(it)
                if target.finished:
                    continue
                if target is not req:
                    self._fork(req, target)
                target.append_token(tok.token_id, tok.logprob, tok.top_logprobs, weight_version, tok.rank)
                touched.append(target)
            req.pending_forks = []
        for req in batch.reqs:
            if not req.finished:
                self.bm.cache_full_blocks(req)
        for req in touched:
            stop = check_stop(req)
            if stop is not None:
                self.finish(req, *stop)
        for req in batch.scored:
            if not req.finished:
                self.finish(req, "length")
                touched.append(req)
        return touched

    def _fork(self, parent: Request, child: Request) -> None:
        self.bm.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.status = RequestStatus.RUNNING
        self.running.append(child)

    # -- state changes -------------------------------------------------------------------
    def preempt(self, req: Request) -> None:
        """Free the request's KV, keep its tokens, put it at the head of the queue."""
        self.running.remove(req)
        self.bm.free(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def retract_all(self) -> list[Request]:
        """Preempt every running request (pause mode `retract`); keeps arrival order."""
        return self.retract(list(self.running))

    def retract(self, reqs: list[Request]) -> list[Request]:
        """Preempt these running requests; they keep their order at the head of the queue."""
        for req in reversed(reqs):
            self.preempt(req)
        return reqs

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING and req in self.waiting:
            self.waiting.remove(req)
        self.bm.free(req)
        req.drop_placeholders()
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
