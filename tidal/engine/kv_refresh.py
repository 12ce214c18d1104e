"""KV refresh: running requests get their KV recomputed under the staged weights before the commit.

A running request's KV was computed by the old weights, so after a commit it is recomputed for
its next tokens to be the new weights' continuation. Done at the commit, that is one prefill of
every running request's whole sequence between two steps: the longest stall a push with no pause
causes (0.5B shape on the CPU, one request of ~100 tokens: 4.1 of the 4.4 decode steps measured;
with many requests, one prefill of all of them).

When the staged weights sit in buffers shaped like the parameters (the CPU swap staging,
weight_swap.py), the engine can run them before the commit. Between two steps a refresh pass
points the parameters at the staged buffers (`SwapStage.applied`), runs one forward pass over
chunks of running requests' sequences, and points them back. Each chunk is written into blocks of
the request's *shadow*: a block table beside the request's own, which no step reads. The pass is
sized to take about as long as a decode step (its size adapts to the measured times), so
generation goes on at about half speed meanwhile instead of stopping. The update's reply (staged,
or committed) waits until every decoding request's shadow has caught up with it, or until the
refresh gives up (the update's deadline, no progress for a few passes, no free blocks). The commit
then hands each request its shadow's blocks, its KV under the new weights so far, and the next
step computes only the tokens generated since. A request without a shadow is retracted and
recomputed, as before.

What it buys, and costs (benchmarks/weight_sync.py --streams 4, 0.5B shape, float32, 2-core CPU):
the longest gap between two tokens of a request through a push falls from 3.8 decode steps to 2.2.
But each pass reads every weight once more, which on a CPU costs about a decode step whatever the
pass computes, and the shadows must outrun the requests: 7-16 passes, so generation runs at about
half speed for 3-7 s, the push takes 4.6-8.5 s instead of 1.6, and fewer tokens come out in all
than with the one stall at the commit. So it is opt-in (EngineConfig.kv_refresh, `--kv-refresh`):
for a caller to whom the longest stall matters more than throughput. (On CUDA the staged tensors
are not parameter-shaped and the commit copies; the refresh does not run there.)

Shadows take blocks that live requests may need: a pass allocates only while the pool keeps a
reserve (the watermark plus two blocks per running request), never preempts, and drops the shadow
of a request that stopped running. Only the core thread runs a refresh; the worker is done.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from tidal.engine.request import Request, RequestStatus
from tidal.engine.weight_swap import SwapStage
from tidal.runner.batch import ScheduledBatch
from tidal.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tidal.engine.core import EngineCore

log = logging.getLogger("tidal.engine")

CAUGHT_UP = 2  # a decoding request's shadow at most this many tokens behind it is caught up
STALLED_PASSES = 3  # passes without the total lag shrinking before the refresh gives up
PASS_TO_STEP = 0.8  # a pass aims at this fraction of the last decode step's time
_NO_SAMPLING = SamplingParams(max_tokens=1)


class KvRefresh:
    def __init__(self, core: EngineCore, swap: SwapStage, deadline: float) -> None:
        self.core, self.swap, self.deadline = core, swap, deadline
        self.shadows: dict[Request, Request] = {}
        self.budget = 2 * core.block_manager.block_size  # tokens in the next pass
        self.passes = 0
        self.tokens = 0
        self.started = time.monotonic()
        self.gave_up: str | None = None
        self.caught_up = False
        self._best_lag: int | None = None
        self._stalled = 0
        # Prepacked copies of the old weights would stand in for the staged ones in the passes;
        # the commit drops them anyway (ModelRunner.weights_updated).
        core.runner.weights_updated()

    @staticmethod
    def _target(req: Request) -> int:
        """How far a shadow may go: the tokens the request has computed and whose ids are known."""
        return min(req.num_computed_tokens, req.num_tokens - 1 - req.num_pending)

    def tick(self) -> bool:
        """One refresh pass between two steps; True once the refresh has caught up or given up.
        After that (an update staged, waiting for its commit) a pass runs only when some shadow
        has fallen a block behind, so that a commit still finds them close."""
        core = self.core
        if self.gave_up is not None:
            return True
        core.flush()  # the steps' bookkeeping settled: token ids known, no row in flight
        self._drop_stale()
        if core.runner.kv_cache is None:
            return self._give_up("the KV cache was released")
        if time.monotonic() >= self.deadline:
            return self._give_up("deadline")
        running = core.scheduler.running
        self._relieve(running)
        for req in running:
            if req not in self.shadows:
                self.shadows[req] = _shadow_of(req)
        if self.caught_up and all(
            self._target(r) - self.shadows[r].num_computed_tokens < core.block_manager.block_size for r in running
        ):
            return True
        batch = self._plan(running)
        lag = self._lag(running)
        if not batch.reqs:
            self.caught_up = self.caught_up or lag == 0
            return self.caught_up or self._give_up("no free blocks")
        t0 = time.perf_counter()
        try:
            with self.swap.applied():
                core.runner.collect(core.runner.launch(batch, -1))
        except Exception as e:  # the update itself is sound: commit without the refresh
            log.exception("KV refresh pass failed; running requests recompute at the commit")
            return self._give_up(f"pass failed: {type(e).__name__}: {e}")
        elapsed = time.perf_counter() - t0
        for shadow, n in zip(batch.reqs, batch.num_new_tokens):
            shadow.num_computed_tokens += n
        self.passes += 1
        self.tokens += batch.num_tokens
        log.debug(
            "kv refresh pass %d: %d rows, %d tokens in %.1f ms (last step %.1f ms), lag %d",
            self.passes,
            len(batch.reqs),
            batch.num_tokens,
            elapsed * 1e3,
            core.last_step_time * 1e3,
            lag,
        )
        self._adapt(elapsed, len(running))
        self.caught_up = self.caught_up or self._caught_up(running, lag - batch.num_tokens)
        return self.caught_up or self.gave_up is not None

    def _reserve(self, running: list[Request]) -> int:
        return self.core.block_manager.watermark_blocks + 2 * len(running)

    def _relieve(self, running: list[Request]) -> None:
        """The live requests grew into the reserve: free the newest requests' shadows until it is
        whole again (a shadow is worth less than a preemption)."""
        bm = self.core.block_manager
        for req in reversed(running):
            if bm.num_free_blocks >= self._reserve(running):
                return
            shadow = self.shadows.get(req)
            if shadow is not None and shadow.block_table:
                bm.free(shadow)

    def _plan(self, running: list[Request]) -> ScheduledBatch:
        """The next pass: each shadow's lag, oldest request first, within the budget and the
        blocks the pool can spare."""
        bm = self.core.block_manager
        batch: ScheduledBatch[Request] = ScheduledBatch()
        budget = self.budget
        reserve = self._reserve(running)
        for req in running:
            shadow = self.shadows[req]
            n = min(self._target(req) - shadow.num_computed_tokens, budget)
            if n <= 0:
                continue
            need = bm.blocks_needed(shadow.num_computed_tokens + n) - len(shadow.block_table)
            if need > bm.num_free_blocks - reserve or not bm.allocate_slots(shadow, n, batch.blocks_to_copy):
                continue
            batch.reqs.append(shadow)
            batch.num_new_tokens.append(n)
            batch.sample_for.append([])
            budget -= n
            if budget <= 0:
                break
        return batch

    def _lag(self, running: list[Request]) -> int:
        return sum(max(0, self._target(r) - self.shadows[r].num_computed_tokens) for r in running)

    def _caught_up(self, running: list[Request], lag: int) -> bool:
        decoding = [r for r in running if r.num_computed_tokens >= r.num_tokens - 1]
        if all(self._target(r) - self.shadows[r].num_computed_tokens <= CAUGHT_UP for r in decoding):
            return True
        if self._best_lag is None or lag < self._best_lag:
            self._best_lag, self._stalled = lag, 0
        else:
            self._stalled += 1
        if self._stalled >= STALLED_PASSES:
            self._give_up("no progress")
        return False

    def _adapt(self, elapsed: float, num_running: int) -> None:
        """Size the next pass to take PASS_TO_STEP of a decode step, but always more tokens than
        the running requests add per step, so that the shadows catch up."""
        step = self.core.last_step_time
        floor = num_running + self.core.block_manager.block_size
        if step > 0 and elapsed > 0:
            wanted = self.budget * PASS_TO_STEP * step / elapsed
            self.budget = int((self.budget * wanted) ** 0.5)  # halfway, geometrically: passes vary
        self.budget = max(floor, min(self.budget, self.core.config.max_num_batched_tokens))

    def _give_up(self, why: str) -> bool:
        self.gave_up = why
        return True

    def _drop_stale(self) -> None:
        for req in [r for r in self.shadows if r.status is not RequestStatus.RUNNING]:
            self.core.block_manager.free(self.shadows.pop(req))

    def switch(self) -> set[Request]:
        """At the commit: every running request with a refreshed prefix takes its shadow's
        blocks (and frees its own); returns them. The other shadows are freed."""
        bm = self.core.block_manager
        self._drop_stale()
        moved = set()
        for req, shadow in self.shadows.items():
            done = shadow.num_computed_tokens
            if done == 0 or done > req.num_tokens - 1 - req.num_pending:
                bm.free(shadow)
                continue
            bm.free(req)
            req.block_table, shadow.block_table = shadow.block_table, []
            req.num_computed_tokens = done
            req.num_cached_blocks = 0  # registered in the (reset) prefix cache as they fill
            moved.add(req)
        self.shadows.clear()
        return moved

    def drop(self, why: str | None = None) -> None:
        """Free every shadow: the update will not commit, or (`why`) the refresh is over before it
        caught up (the KV pool is going away, an error)."""
        for shadow in self.shadows.values():
            self.core.block_manager.free(shadow)
        self.shadows.clear()
        if why is not None:
            self.gave_up = why

    def summary(self) -> dict:
        return {
            "passes": self.passes,
            "tokens": self.tokens,
            "seconds": time.monotonic() - self.started,
            "caught_up": self.caught_up,
            "gave_up": self.gave_up,
        }


def _shadow_of(req: Request) -> Request:
    """A block table for `req`'s sequence under the staged weights: reads its token ids (the same
    list, so it sees the tokens generated meanwhile), samples nothing."""
    shadow = Request(req.request_id, req.index, [], _NO_SAMPLING, seed=0, max_model_len=req.max_model_len)
    shadow.token_ids = req.token_ids
    shadow.status = RequestStatus.RUNNING
    return shadow
