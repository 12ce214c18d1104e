"""EngineCore: one thread owns every piece of mutable engine state (DESIGN.md §2).

Other threads talk to it only through `submit()` (the inbox). The loop drains the inbox at
the top of every step, then schedules, executes and post-processes one batch, and hands the
outputs to `output_handler` (still on the core thread, so an output is always delivered
before any reply to a control call that follows it). It blocks on the inbox only when there
is nothing to run.

Overlap scheduling (`EngineConfig.overlap_scheduling`, on by default): a step launches its batch
on the device and, instead of waiting for the sampled tokens, returns; the next step schedules and
launches batch N+1 (decode rows take their input tokens from step N's device tensor), and only then
waits for step N's tokens and resolves them (stops, outputs). So the host's scheduling, input
preparation and output handling run while the GPU computes. Before anything else looks at engine
state (an inbox message, a drain deadline, an idle loop) the step in flight is resolved (`flush`),
so control calls always see a settled state. Steps that fork n-sample prompts, and lookahead
schedules that ran out of blocks, are resolved at once.

One job past 400 lines: the single-writer loop and the request bookkeeping only it may touch."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future

from tidal.config import EngineConfig
from tidal.engine.control import ControlPlane
from tidal.engine.io import check_prior_output_tokens
from tidal.engine.kv_cache import BlockManager
from tidal.engine.messages import (
    AddRequest,
    ControlCall,
    EngineDead,
    EngineInvalidInput,
    EngineOutput,
    EngineState,
    Shutdown,
)
from tidal.engine.request import Request
from tidal.engine.scheduler import Scheduler
from tidal.models.loader import checkpoint_fingerprint
from tidal.runner.runner import ModelRunner, StepHandle

log = logging.getLogger("tidal.engine")

OutputHandler = Callable[[list[EngineOutput]], None]


def resolve_model_path(model: str | None) -> str:
    if model is None:
        from tidal.models.tiny import tiny_checkpoint_cached

        return tiny_checkpoint_cached("qwen3")
    return model


def derive_seed(seed: int, index: int) -> int:
    """Per-sample seed: sample 0 uses the request's seed, the others a mix of seed and index."""
    if index == 0:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & 0x7FFFFFFFFFFFFFFF


class EngineCore:
    def __init__(self, config: EngineConfig, output_handler: OutputHandler) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.output_handler = output_handler
        self.runner = ModelRunner(config, self.model_path)
        self.eos_token_ids = tuple(self.runner.arch.eos_token_ids)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.max_model_len = self._fit_max_model_len()
        self.scheduler = Scheduler(config, self.block_manager)
        self.tokenizer = None  # loaded lazily, only for stop strings
        self.held: list[Request] = []  # arrived while not serving; admitted on resume
        self.weight_version = 0
        # Where the serving weights can be re-read from (sleep with discard); None for random
        # or in-memory weights.
        self.weight_source: str | None = None if config.load_format == "dummy" else self.model_path
        # What was loaded from `weight_source` (loader.checkpoint_fingerprint); a wake after a
        # discarding sleep refuses a source that no longer matches it.
        self.weight_fingerprint = None if self.weight_source is None else checkpoint_fingerprint(self.weight_source)
        self.weights_loaded = True  # False while a discarding sleep leaves placeholders
        self.state = EngineState.STARTING
        self.control = ControlPlane(self)
        self.rng = random.Random(config.seed)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.step_count = 0
        self.last_step_time = 0.0
        self.last_step_end = time.monotonic()
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self.inflight: tuple[object, StepHandle] | None = None  # launched, not yet resolved
        self.num_overlapped_steps = 0  # steps launched while the previous one was in flight

    def _fit_max_model_len(self) -> int:
        """A sequence of max_model_len tokens must fit the KV pool even alone, or a request that
        grows that long is preempted and can never be re-admitted. An explicit max_model_len that
        does not fit is an error; the model's default is lowered with a warning (as vLLM does)."""
        bm = self.block_manager
        fits = (bm.num_blocks - bm.watermark_blocks) * bm.block_size
        wanted = self.runner.max_model_len
        if wanted <= fits:
            return wanted
        if self.config.max_model_len is not None:
            raise ValueError(
                f"EngineConfig.max_model_len={self.config.max_model_len} is invalid: the KV "
                f"pool ({bm.num_blocks} blocks of {bm.block_size} tokens, {bm.watermark_blocks} "
                f"kept free for admission) holds at most {fits} tokens of one sequence; "
                "expected max_model_len <= that, or a larger num_kv_blocks/KV memory"
            )
        if fits < 1:
            raise ValueError(
                f"EngineConfig.num_kv_blocks={bm.num_blocks} is invalid: the KV pool cannot "
                "hold one token of a sequence; expected more blocks"
            )
        log.warning(
            "max_model_len lowered from the model's %d to %d tokens: the KV pool (%d blocks of %d) "
            "cannot hold a longer sequence",
            wanted,
            fits,
            bm.num_blocks,
            bm.block_size,
        )
        self.runner.max_model_len = fits
        return fits

    # -- thread boundary -----------------------------------------------------------------
    def start(self) -> None:
        self.state = EngineState.SERVING
        self._thread = threading.Thread(target=self._run, name="tidal-core", daemon=True)
        self._thread.start()

    def submit(self, msg: object) -> None:
        """The only entry point for other threads."""
        if self.state is EngineState.DEAD:
            self._fail_message(msg)
            return
        self.inbox.put(msg)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the loop (in-flight requests end with "abort") and release the device memory."""
        self.inbox.put(Shutdown())
        if self._thread is not None:
            self._thread.join(timeout_s)
        if not self.alive:  # the loop is gone: nothing touches the runner any more
            self.control.weights.close()
            self.runner.release()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                if not self._drain_inbox(block=not self._has_runnable_work() and self.inflight is None):
                    break
                if self._has_runnable_work():
                    self.step()
                else:
                    self.flush()
                self.control.poll()
        except BaseException as e:  # the loop must never die silently
            self._die(f"{type(e).__name__}: {e}", traceback.format_exc())

    def _has_runnable_work(self) -> bool:
        return self.control.can_schedule() and self.scheduler.has_work()

    def _drain_inbox(self, block: bool) -> bool:
        """Handle every queued message; returns False on shutdown."""
        while True:
            try:
                timeout = self.control.idle_timeout() if block else None
                msg = self.inbox.get(timeout=timeout) if block else self.inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            self.flush()  # control and requests act on a settled state
            if isinstance(msg, Shutdown):
                self._finish_all("abort", error="engine shut down")
                self.state = EngineState.DEAD
                return False
            self._handle(msg)

    def _handle(self, msg: object) -> None:
        if isinstance(msg, AddRequest):
            self._add_request(msg)
        elif isinstance(msg, ControlCall):
            self.control.handle(msg)
        else:
            raise TypeError(f"unknown inbox message {msg!r}")

    def step(self) -> None:
        t0 = time.perf_counter()
        prev = self.inflight
        batch = self.scheduler.schedule(admit=self.control.can_admit(), lookahead=prev is not None)
        if not batch.reqs:
            self.flush()
            return
        handle = self.runner.launch(batch, self.step_count, prev[1] if prev is not None else None)
        self.scheduler.advance(batch, self.step_count)
        self.inflight = (batch, handle)
        self.step_count += 1
        if prev is not None:
            self.num_overlapped_steps += 1
            self._resolve(*prev)
        if not self.config.overlap_scheduling or batch.needs_sync or any(len(group) > 1 for group in batch.sample_for):
            self.flush()
        self.last_step_time = time.perf_counter() - t0
        self.last_step_end = time.monotonic()

    def flush(self) -> None:
        """Resolve the step in flight, if any."""
        if self.inflight is not None:
            batch, handle = self.inflight
            self.inflight = None
            self._resolve(batch, handle)

    def _resolve(self, batch, handle: StepHandle) -> None:
        sampled = self.runner.collect(handle)
        prompt = self.runner.collect_prompt_logprobs(handle)
        touched = self.scheduler.resolve(batch, sampled, self.weight_version, prompt)
        self.runner.free_requests(r for r in touched if r.finished)
        self._emit(touched)

    # -- requests ------------------------------------------------------------------------
    def _add_request(self, msg: AddRequest) -> None:
        p = msg.params
        invalid = self.unschedulable(msg)
        if invalid is not None:
            self._reject(msg, str(invalid), "invalid_input", invalid.field)
            return
        if self.control.rejecting():
            self._reject(msg, f"rejected: engine is {self.state.value}", "not_serving")
            return
        base_seed = p.seed if p.seed is not None else self.rng.getrandbits(62)
        samples = [
            Request(
                msg.request_id,
                i,
                list(msg.prompt_token_ids),
                p,
                derive_seed(base_seed, i),
                eos_token_ids=self.eos_token_ids,
                max_model_len=self.max_model_len,
                final_only=msg.final_only,
                prior_output_tokens=msg.prior_output_tokens,
            )
            for i in range(p.n)
        ]
        if p.stop:
            for r in samples:
                r.detokenizer = self._make_detokenizer(r)
        head = samples[0]
        head.pending_forks = samples[1:]
        if self.control.holding():
            self.held.append(head)
        else:
            self.scheduler.add(head)

    def unschedulable(self, msg: AddRequest) -> EngineInvalidInput | None:
        """Why `msg` could never be scheduled, whatever else runs: admitted, it would wait at the
        head of the queue forever and hold every request behind it."""
        try:
            check_prior_output_tokens(msg.prior_output_tokens, len(msg.prompt_token_ids))
        except EngineInvalidInput as e:
            return e
        n, seqs = msg.params.n, self.config.max_num_seqs
        if n > seqs:
            return EngineInvalidInput(
                "n",
                n,
                f"at most max_num_seqs={seqs}",
                f"n={n} is invalid: expected at most max_num_seqs={seqs} samples",
            )
        # The prompt and the first sampled token (a scoring request samples none).
        need = len(msg.prompt_token_ids) + (1 if msg.params.max_tokens else 0)
        if need > self.max_model_len:
            return EngineInvalidInput(
                "prompt",
                len(msg.prompt_token_ids),
                f"at most {self.max_model_len - 1} tokens",
                f"prompt has {need - 1} tokens: expected at most {self.max_model_len - 1} "
                f"(max_model_len={self.max_model_len} includes one output token)",
            )
        bm = self.block_manager
        if bm.blocks_needed(need) + bm.watermark_blocks > bm.num_blocks:
            return EngineInvalidInput(
                "prompt",
                need - 1,
                "a prompt that fits the KV pool",
                f"prompt has {need - 1} tokens: the KV pool holds {bm.num_blocks} blocks "
                f"of {bm.block_size} tokens, too few for it",
            )
        return None

    def _reject(self, msg: AddRequest, error: str, error_type: str, error_param: str | None = None) -> None:
        self.output_handler(
            [
                EngineOutput(
                    msg.request_id,
                    i,
                    [],
                    finish_reason="abort",
                    num_prompt_tokens=len(msg.prompt_token_ids),
                    error=error,
                    error_type=error_type,
                    error_param=error_param,
                )
                for i in range(msg.params.n)
            ]
        )

    def _make_detokenizer(self, req: Request):
        from tidal.engine.detokenizer import IncrementalDetokenizer

        if self.tokenizer is None:
            from tidal.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.model_path)
        return IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params.skip_special_tokens)

    def find_requests(self, request_ids: list[str] | None) -> list[Request]:
        """Every live sample (running, waiting, held, pending forks) of the given ids."""
        live = self.scheduler.live_requests()
        for head in self.held:
            live.append(head)
            live.extend(head.pending_forks)
        if request_ids is None:
            return live
        wanted = set(request_ids)
        return [r for r in live if r.request_id in wanted]

    def held_requests(self) -> list[Request]:
        """Samples that arrived while not serving and wait for resume (heads and their forks)."""
        held = list(self.held)
        for head in self.held:
            held.extend(head.pending_forks)
        return held

    def release_held(self) -> int:
        """Admit every held request (on resume); returns how many were held."""
        for head in self.held:
            self.scheduler.add(head)
        released, self.held = len(self.held), []
        return released

    def abort(self, request_ids: list[str] | None) -> dict:
        reqs = self.find_requests(request_ids)
        self.end_requests(reqs, "abort")
        found = {r.request_id for r in reqs}
        return {
            "aborted": sorted(found),
            "unknown": sorted(set(request_ids or []) - found),
            "num_aborted_samples": len(reqs),
        }

    def end_requests(
        self, reqs: list[Request], reason: str, error: str | None = None, error_type: str | None = None
    ) -> None:
        """Finish `reqs` now with what they have, free their KV, and hand out their outputs."""
        ended = []
        for req in reqs:
            if req.finished:
                continue
            if req in self.held:
                self.held.remove(req)
            req.pending_forks = []  # they are in `reqs` too (find_requests lists them)
            self.scheduler.finish(req, reason)
            ended.append(req)
        self.runner.free_requests(ended)
        self._emit(ended, error=error, error_type=error_type)

    def _finish_all(self, reason: str, error: str | None = None, error_type: str | None = None) -> None:
        self.end_requests(self.find_requests(None), reason, error, error_type)

    def _emit(self, reqs: list[Request], error: str | None = None, error_type: str | None = None) -> None:
        outs = []
        for req in reqs:
            if req.final_only and not req.finished:
                continue
            start = req.num_sent_tokens
            end = req.num_resolved_output_tokens
            new = req.token_ids[req.num_prompt_tokens + start : req.num_prompt_tokens + end]
            if not new and not req.finished:
                continue
            req.num_sent_tokens = end
            want_lp = req.params.logprobs is not None
            out = EngineOutput(
                request_id=req.request_id,
                index=req.index,
                new_token_ids=new,
                new_logprobs=req.output_logprobs[start:] if want_lp else None,
                new_top_logprobs=req.output_top_logprobs[start:] if req.params.logprobs else None,
                finish_reason=req.finish_reason,
                stop_reason=req.stop_reason,
                weight_version=self.weight_version,
                weight_spans=[(s.version, s.start, s.end) for s in req.weight_spans] if req.finished else None,
                num_prompt_tokens=req.num_prompt_tokens,
                error=error,
                error_type=error_type,
                new_ranks=req.output_ranks[start:] if want_lp else None,
                num_cached_tokens=max(req.num_cached_tokens, 0),
            )
            self._attach_prompt_logprobs(req, out)
            outs.append(out)
        if outs:
            self.output_handler(outs)

    @staticmethod
    def _attach_prompt_logprobs(req: Request, out: EngineOutput) -> None:
        """Once per request: when sample 0's prompt is scored, or when it ends (then with what
        was scored, e.g. an abort mid-prefill)."""
        if (
            req.index != 0
            or req.params.prompt_logprobs is None
            or req.prompt_logprobs_sent
            or (req.needs_prompt_logprobs and not req.finished)
        ):
            return
        req.prompt_logprobs_sent = True
        out.prompt_logprobs = list(req.prompt_logprobs)
        out.prompt_ranks = list(req.prompt_ranks)
        if req.params.prompt_logprobs:
            out.prompt_top_logprobs = list(req.prompt_top_logprobs)

    # -- failure -------------------------------------------------------------------------
    def _die(self, reason: str, tb: str) -> None:
        log.error("engine core died: %s\n%s", reason, tb)
        self.error = reason
        try:
            self._finish_all("abort", error=f"engine core died: {reason}", error_type="engine_dead")
        except BaseException:  # state may be inconsistent; still fail the outputs we can
            log.exception("could not end requests cleanly")
        self.state = EngineState.DEAD
        self.control.fail_pending(EngineDead(f"engine core died: {reason}"))
        while True:  # fail everything that raced into the inbox
            try:
                self._fail_message(self.inbox.get_nowait())
            except queue.Empty:
                break

    def _fail_message(self, msg: object) -> None:
        err = EngineDead(f"engine core is dead: {self.error or 'shut down'}")
        reply: Future | None = getattr(msg, "reply", None)
        if reply is not None and not reply.done():
            reply.set_exception(err)
        if isinstance(msg, AddRequest):
            self.output_handler(
                [
                    EngineOutput(msg.request_id, i, [], finish_reason="abort", error=str(err), error_type="engine_dead")
                    for i in range(msg.params.n)
                ]
            )
