"""ModelRunner: turns a ScheduledBatch into tensors, runs the model, samples on the device.

A step is split in two so that the engine can overlap host work with the GPU (EngineCore.step):
`launch` uploads the step's inputs, enqueues the forward pass and the sampler, and starts the copy
of the sampled tokens into pinned host memory; `collect` waits for that copy and turns it into
SampledTokens. Nothing in between synchronises with the device, so the only host sync per step is
the wait in `collect`. A decode row whose input token is still a placeholder (its previous step
was not collected yet) takes the token from that step's sampled tensor, on the device.

On the CPU a step's torch ops run on torch's intra-op threads only when its linear work pays for
the split (`cpu_step_threads`): a decode step of a small model runs its ops on one thread (the
same step on two threads was ~10% slower, and a single stream 2x slower, on a 2-core machine),
while the C decode kernel still splits rows that read enough cached tokens.

Decode steps replay CUDA graphs (one per batch-size bucket) unless `enforce_eager`; the graphs are
built at start-up and again after the KV cache or the weights moved (sleep / wake).

The runner keeps its own per-request state (`sampling_rows`) and writes nothing into the requests
it is given. One file, past 400 lines, for one job: a batch in, one device step, tokens out; the
staging buffers and the step handle exist only for that.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from tidal.attention.base import AttentionMetadata, get_backend
from tidal.attention.context import ForwardContext
from tidal.config import EngineConfig
from tidal.kernels.fused import use_fused_kernels
from tidal.models.layers import drop_derived_weights, set_batch_invariant, set_cpu_prepack
from tidal.models.loader import load_model
from tidal.runner.batch import PLACEHOLDER, BatchRequest, PromptLogprobs, SampledToken, ScheduledBatch
from tidal.runner.sampler import (
    PenaltyTensors,
    Sampler,
    SamplingTensors,
    apply_penalties,
    apply_token_bans,
    token_logprobs,
)

if TYPE_CHECKING:
    from tidal.runner.cuda_graph import CudaGraphRunner

_ALIGN_BYTES = 16
# Rows longer than this get their positions and slots computed with numpy instead of Python ints.
_NUMPY_ROW = 64
# CPU: a step's torch ops use every intra-op thread from this many multiply-adds per decoder layer
# (tokens x the layer's parameters) and one thread below it. benchmarks/vs_vllm_cpu.py's shapes, 2
# cores: a 64-row decode step of the hidden-256 model (5e7) ran faster on one thread, the hidden-1024
# model's (8e8) and every prefill of >= 1,000 tokens (>= 8e8) on two.
CPU_SPLIT_MIN_WORK = 1 << 28
# Prompt logprobs take the LM head over this many positions at a time: a [rows, vocab] float32
# block per pass instead of one for the whole chunk.
_PROMPT_ROWS_PER_PASS = 256


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # [num_targets] row in the flattened batch whose logits each target samples
    # Prompt logprobs (SamplingParams.prompt_logprobs): flat rows whose logits score the next
    # prompt token, those tokens, and per batch row how many of them it owns.
    prompt_rows: torch.Tensor | None = None
    prompt_targets: torch.Tensor | None = None
    prompt_spans: list[tuple[int, int, int]] | None = None  # (batch row, count, top-k)


@dataclass(slots=True)
class StepHandle:
    """A launched step: its sampled tokens on the device, and their host copies once `ready`."""

    step: int
    token_ids: torch.Tensor | None  # [num_targets] on the device (None: nothing sampled)
    host_ids: torch.Tensor | None = None  # pinned copies, valid after `ready`
    host_logprobs: torch.Tensor | None = None
    host_top_ids: torch.Tensor | None = None
    host_top_logprobs: torch.Tensor | None = None
    top_k: list[int] = field(default_factory=list)  # per target: how many alternatives it asked for
    want_logprobs: list[bool] = field(default_factory=list)  # per target (set with token_ids)
    host_ranks: torch.Tensor | None = None
    prompt_spans: list[tuple[int, int, int]] | None = None  # StepInputs.prompt_spans
    host_prompt: list[torch.Tensor] | None = None  # logprobs, ranks[, top ids, top logprobs]
    ready: torch.cuda.Event | None = None  # recorded after the copies (CUDA only)


class _Staging:
    """Pinned host buffers for the small per-step arrays, so that each step uploads with one
    non-blocking copy per dtype instead of one allocation and pin per array.

    Two sets alternate: at most two steps are in flight, and a set is written again only after
    the step that used it two steps ago has been collected (its copies long done)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.sets: list[dict[object, torch.Tensor]] = [{}, {}]
        self.turn = 0

    def buffer(self, key: object, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor of at least n elements for `key` in the current set."""
        bufs = self.sets[self.turn]
        buf = bufs.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            size = max(n, 2 * buf.numel() if buf is not None else 1024)
            buf = bufs[key] = torch.empty(size, dtype=dtype, pin_memory=self.pinned)
        return buf

    def upload(self, key: str, arrays: list[np.ndarray], dtype: torch.dtype) -> list[torch.Tensor]:
        """Device copies of numpy arrays, packed into the host buffer `key` and copied at once.

        Each array starts on a 16-byte boundary: Triton specializes kernels on the alignment of
        their pointer arguments, so views at arbitrary offsets would compile a new variant of a
        kernel whenever the batch's sizes change the offsets' parity."""
        align = max(1, _ALIGN_BYTES // dtype.itemsize)
        starts, at = [], 0
        for a in arrays:
            starts.append(at)
            at += -(-a.size // align) * align
        total = at
        buf = self.buffer(key, total, dtype)
        host = buf.numpy()
        out = []
        for a, at in zip(arrays, starts):
            host[at : at + a.size] = a.reshape(-1)
            out.append((at, a.shape))
        if self.pinned:
            dev = buf[:total].to(self.device, non_blocking=True)
        else:
            dev = buf[:total].clone()
        return [dev[a : a + int(np.prod(shape))].view(shape) for a, shape in out]

    def flip(self) -> None:
        self.turn ^= 1


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.model = load_model(model_path, self.dtype, self.device, config.load_format, config.seed)
        self._set_numerics()
        self.fused = use_fused_kernels(self.model, config.fused_kernels, self.device)
        self.arch = self.model.arch
        if config.max_model_len is not None and config.max_model_len > self.arch.max_model_len:
            raise ValueError(
                f"EngineConfig.max_model_len={config.max_model_len} is invalid: expected at most the "
                f"model's context length, max_position_embeddings={self.arch.max_model_len}"
            )
        self.max_model_len = config.max_model_len or self.arch.max_model_len
        self.block_size = config.block_size
        self.backend = self._attention_backend()
        self.sampler = Sampler(batch_invariant=config.batch_invariant and self.device.type == "cuda")
        # The runner's own per-request cache: each live request's packed sampling parameters,
        # keyed by the request itself (ids are the client's: the n samples of a prompt share one,
        # and an ended request's id can come back). The engine frees entries as requests finish.
        self.sampling_rows: dict[BatchRequest, tuple] = {}
        self.num_blocks = config.num_kv_blocks or self._profile_num_blocks()
        # CPU: the intra-op threads a step may use (torch's count when the runner was built)
        self.cpu_threads = torch.get_num_threads() if self.device.type == "cpu" else 0
        layer_params = [p.numel() for n, p in self.model.named_parameters() if ".layers." in n]
        self.layer_params = sum(layer_params) / self.arch.num_layers if layer_params else 0.0
        self.kv_cache: torch.Tensor | None = None
        self.allocate_kv_cache()
        self.staging = _Staging(self.device)
        self.use_graphs = self.device.type == "cuda" and not config.enforce_eager
        self.graphs: CudaGraphRunner | None = None  # decode graphs (GPU only); rebuilt after sleep / wake
        self._ensure_graphs()

    def _set_numerics(self) -> None:
        """EngineConfig.lm_head_dtype and batch_invariant (docs/numerics.md), on the model."""
        self.model.lm_head_dtype = torch.float32 if self.config.lm_head_dtype == "float32" else None
        set_batch_invariant(self.model, self.config.batch_invariant)
        set_cpu_prepack(
            self.model,
            self.config.cpu_prepack_weights and self.device.type == "cpu" and torch.backends.mkldnn.is_available(),
        )

    def _attention_backend(self):
        return get_backend(self.config.attention_backend)

    # -- KV cache ------------------------------------------------------------------------
    @property
    def kv_block_bytes(self) -> int:
        a = self.arch
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def _profile_num_blocks(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.config.gpu_memory_utilization - used - self._activation_reserve()
        else:
            budget = self.config.kv_cache_memory_gb * (1 << 30)
        blocks = int(budget // self.kv_block_bytes)
        if blocks < 2:
            raise ValueError(
                f"KV cache does not fit: {budget / 2**20:.0f} MiB left for it, one block "
                f"needs {self.kv_block_bytes / 2**20:.2f} MiB; lower max_num_batched_tokens "
                f"or raise gpu_memory_utilization/kv_cache_memory_gb"
            )
        return blocks

    def _activation_reserve(self) -> int:
        a = self.arch
        tokens = self.config.max_num_batched_tokens
        # logits for the sampled rows plus a generous per-token activation footprint
        return self.config.max_num_seqs * a.vocab_size * 4 * 4 + tokens * a.hidden_size * 4 * 16 + (512 << 20)

    def allocate_kv_cache(self) -> None:
        a = self.arch
        self.kv_cache = torch.zeros(
            a.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            a.num_kv_heads,
            a.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def free_kv_cache(self) -> None:
        self.kv_cache = None
        self.invalidate_graphs()

    def release(self) -> None:
        """Drop the KV cache, the graphs, the weights and the per-request caches (engine shut down)."""
        self.sampling_rows.clear()
        self.free_kv_cache()
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def weights_updated(self) -> None:
        """A weight update committed. CPU linears stop running on prepacked weights
        (EngineConfig.cpu_prepack_weights): repacking a model's large weights after every update
        costs more than the packed products save in an RL step (0.5B shape, 2 cores: a push went
        from 0.86 s to 2.9-5.8 s with the packing on the weights worker, and packing lazily would
        stall the first step after each commit instead). Weights that do not change keep it."""
        if self.model is not None:
            set_cpu_prepack(self.model, False)

    def invalidate_graphs(self) -> None:
        """Captured graphs hold raw pointers to weights and the KV cache; drop them whenever
        either moves (sleep/wake). The copies derived from the weights (fp32 LM head, prepacked CPU
        weights) go too, so that sleep frees them."""
        self.graphs = None
        if self.model is not None:
            drop_derived_weights(self.model)

    def _ensure_graphs(self) -> None:
        if self.use_graphs and self.graphs is None and self.kv_cache is not None:
            from tidal.runner.cuda_graph import CudaGraphRunner

            max_blocks = -(-self.max_model_len // self.block_size)
            self.graphs = CudaGraphRunner(
                self.model, self.kv_cache, self.backend, self.config.max_num_seqs, max_blocks, self.block_size
            )

    # -- per-request caches --------------------------------------------------------------
    def free_requests(self, reqs: Iterable[BatchRequest]) -> None:
        """Forget what the runner cached for these requests (they finished)."""
        for r in reqs:
            self.sampling_rows.pop(r, None)

    # -- one step ------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch, prev: StepHandle | None = None) -> StepInputs:
        """Device inputs of a step. A row whose input token is a placeholder takes it from
        `prev.token_ids` (the step launched before this one, not collected yet)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        fix_rows: list[int] = []  # flat token index whose id comes from prev
        fix_from: list[int] = []  # ... and its row in prev's sampled tokens
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_spans: list[tuple[int, int, int]] = []
        for b, (req, n, group) in enumerate(zip(batch.reqs, batch.num_new_tokens, batch.sample_for)):
            start = req.num_computed_tokens
            if req.needs_prompt_logprobs:
                self._prompt_rows(req, b, len(ids), n, prompt_rows, prompt_targets, prompt_spans)
            table = req.block_table
            if n == 1:
                ids.append(req.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            elif n <= _NUMPY_ROW:
                ids.extend(req.token_ids[start : start + n])
                rng = range(start, start + n)
                positions.extend(rng)
                slots.extend(table[p // bs] * bs + p % bs for p in rng)
            else:
                ids.extend(req.token_ids[start : start + n])
                pos = np.arange(start, start + n, dtype=np.int64)
                positions.extend(pos.tolist())
                slots.extend((np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs).tolist())
            if ids[-1] == PLACEHOLDER:
                fix_rows.append(len(ids) - 1)
                fix_from.append(self._pending_row(req, prev))
            query_lens.append(n)
            seq_lens.append(start + n)
            if group:
                logits_rows.extend([len(ids) - 1] * len(group))
        tables = _block_tables(batch.reqs)
        qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        longs = [
            np.asarray(ids, dtype=np.int64),
            np.asarray(positions, dtype=np.int64),
            np.asarray(slots, dtype=np.int64),
            np.asarray(logits_rows, dtype=np.int64),
            np.asarray(fix_rows, dtype=np.int64),
            np.asarray(fix_from, dtype=np.int64),
        ]
        ints = [qsl, np.asarray(seq_lens, dtype=np.int32), tables]
        input_ids, pos_d, slots_d, rows_d, fix_rows_d, fix_from_d = self.staging.upload("inputs64", longs, torch.int64)
        qsl_d, seq_lens_d, tables_d = self.staging.upload("inputs32", ints, torch.int32)
        if fix_rows:
            input_ids.index_copy_(0, fix_rows_d, _sampled_ids(prev).index_select(0, fix_from_d))
        meta = AttentionMetadata(
            slot_mapping=slots_d,
            query_start_loc=qsl_d,
            seq_lens=seq_lens_d,
            block_tables=tables_d,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            cpu_threads=self.cpu_threads,
        )
        inputs = StepInputs(input_ids=input_ids, positions=pos_d, meta=meta, logits_rows=rows_d)
        if prompt_rows:
            inputs.prompt_rows, inputs.prompt_targets = self.staging.upload(
                "prompt64",
                [np.asarray(prompt_rows, dtype=np.int64), np.asarray(prompt_targets, dtype=np.int64)],
                torch.int64,
            )
            inputs.prompt_spans = prompt_spans
        return inputs

    @staticmethod
    def _prompt_rows(
        req: BatchRequest,
        b: int,
        base: int,
        n: int,
        rows: list[int],
        targets: list[int],
        spans: list[tuple[int, int, int]],
    ) -> None:
        """The positions of this chunk whose logits score a prompt token not yet scored: position
        p scores token p + 1. Tokens scored by a step still in flight sit below `start`, and a
        recompute after preemption skips what was already scored."""
        start = req.num_computed_tokens
        lo = max(start, len(req.prompt_logprobs))
        hi = min(start + n, req.num_prompt_tokens - 1)
        if hi <= lo:
            return
        rows.extend(range(base + lo - start, base + hi - start))
        targets.extend(req.token_ids[lo + 1 : hi + 1])
        spans.append((b, hi - lo, req.params.prompt_logprobs or 0))

    @staticmethod
    def _pending_row(req: BatchRequest, prev: StepHandle | None) -> int:
        if prev is None or req.pending_step != prev.step or req.num_pending != 1:
            raise RuntimeError(
                f"request {req.request_id!r}: its input token is a placeholder of step "
                f"{req.pending_step}, but the step in flight is "
                f"{None if prev is None else prev.step} (num_pending={req.num_pending})"
            )
        return req.pending_row

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, step: int, prev: StepHandle | None = None) -> StepHandle:
        """Enqueue one step on the device; returns without waiting for it."""
        kv = self.kv_cache
        if kv is None:
            raise RuntimeError("forward pass while the KV cache is released (asleep)")
        self._ensure_graphs()
        self.staging.flip()
        if batch.blocks_to_copy:
            _copy_blocks(kv, batch.blocks_to_copy)
        inputs = self.prepare(batch, prev)
        ctx = ForwardContext(inputs.meta, kv, self.backend)
        with _intra_op_threads(self.cpu_step_threads(inputs.input_ids.shape[0])):
            if self.graphs is not None and self.graphs.can_run(inputs):
                hidden = self.graphs.run(inputs)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, ctx)
            targets = batch.targets
            h = StepHandle(step, None)
            if targets:
                logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_rows))
                h = self._sample(logits, targets, step, prev)
            if inputs.prompt_rows is not None:
                self._score_prompt(hidden, inputs, h)
        if self.device.type == "cuda" and (h.token_ids is not None or h.host_prompt is not None):
            h.ready = torch.cuda.Event()
            h.ready.record()
        return h

    def cpu_step_threads(self, num_tokens: int) -> int | None:
        """Intra-op threads for a CPU step of num_tokens rows: all of them from CPU_SPLIT_MIN_WORK
        multiply-adds per layer, else one; None: leave torch's count alone (GPU, or one thread)."""
        if self.cpu_threads <= 1:
            return None
        return self.cpu_threads if num_tokens * self.layer_params >= CPU_SPLIT_MIN_WORK else 1

    def _score_prompt(self, hidden: torch.Tensor, inputs: StepInputs, h: StepHandle) -> None:
        """Raw logprobs (the model's distribution) of the prompt tokens this step scores."""
        rows, targets, spans = inputs.prompt_rows, inputs.prompt_targets, inputs.prompt_spans
        if rows is None or targets is None or spans is None:
            return
        k = max(span[2] for span in spans)
        parts: list[list[torch.Tensor]] = []
        for a in range(0, rows.shape[0], _PROMPT_ROWS_PER_PASS):
            logits = self.model.compute_logits(hidden.index_select(0, rows[a : a + _PROMPT_ROWS_PER_PASS])).float()
            lps, ranks, top_ids, top_lps = token_logprobs(
                logits, targets[a : a + _PROMPT_ROWS_PER_PASS], k, self.sampler.batch_invariant
            )
            parts.append([lps, ranks, *(t for t in (top_ids, top_lps) if t is not None)])
        keys = ("p_lps", "p_ranks", "p_top_ids", "p_top_lps")
        h.host_prompt = [
            self._to_host(key, torch.cat([p[i] for p in parts])) for i, key in enumerate(keys[: len(parts[0])])
        ]
        h.prompt_spans = spans

    def collect_prompt_logprobs(self, h: StepHandle) -> dict[int, PromptLogprobs]:
        """Per batch row, the prompt logprobs a collected step computed (after `collect`)."""
        if h.host_prompt is None or h.prompt_spans is None:
            return {}
        if h.ready is not None:
            h.ready.synchronize()
        cols = [t.tolist() for t in h.host_prompt]
        out: dict[int, PromptLogprobs] = {}
        at = 0
        for b, count, k in h.prompt_spans:
            sl = slice(at, at + count)
            tops = None
            if k:
                tops = [dict(zip(ids[:k], lps[:k])) for ids, lps in zip(cols[2][sl], cols[3][sl])]
            out[b] = PromptLogprobs(cols[0][sl], cols[1][sl], tops)
            at += count
        return out

    def collect(self, h: StepHandle) -> list[SampledToken]:
        """Wait for a launched step's tokens (the one host sync of a step)."""
        if h.token_ids is None or h.host_ids is None:
            return []
        if h.ready is not None:
            h.ready.synchronize()
        ids = h.host_ids.tolist()
        lps = h.host_logprobs.tolist() if h.host_logprobs is not None else [None] * len(ids)
        ranks = h.host_ranks.tolist() if h.host_ranks is not None else [None] * len(ids)
        tops: list[dict[int, float] | None] = [None] * len(ids)
        if h.host_top_ids is not None and h.host_top_logprobs is not None:
            top_ids, top_lps = h.host_top_ids.tolist(), h.host_top_logprobs.tolist()
            for i, k in enumerate(h.top_k):
                if k > 0:
                    tops[i] = dict(zip(top_ids[i][:k], top_lps[i][:k]))
        return [
            SampledToken(tok, lp if want else None, top, rank if want else None)
            for tok, lp, want, top, rank in zip(ids, lps, h.want_logprobs, tops, ranks)
        ]

    def _sampling_tensors(self, targets: list[BatchRequest]) -> SamplingTensors:
        rows = []
        cache = self.sampling_rows
        for r in targets:
            row = cache.get(r)
            if row is None:
                row = cache[r] = SamplingTensors.row(r.params, r.seed, self.config.logprobs_mode)
            rows.append(row)
        # A continuation's step index goes on from the output it already had (seeded noise continues).
        steps = [r.prior_output_tokens + r.num_output_tokens for r in targets]
        return SamplingTensors.from_rows(rows, steps, self.staging)

    def _penalty_tensors(self, targets: list[BatchRequest], prev: StepHandle | None) -> PenaltyTensors | None:
        """The penalties of a step whose targets use any, with the tokens each row counts. A
        target's newest token may still be a placeholder: it is read from `prev` on the device."""
        if not any(r.params.has_penalties for r in targets):
            return None
        floats = np.zeros((3, len(targets)), dtype=np.float32)
        floats[0] = 1.0
        prompt_rows, prompt_ids, out_rows, out_ids, pend_rows, pend_from = [], [], [], [], [], []
        for i, r in enumerate(targets):
            p = r.params
            if not p.has_penalties:
                continue
            floats[:, i] = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
            # a continuation's earlier output is counted as output, once (not also as prompt)
            n_prompt = r.num_prompt_tokens - r.prior_output_tokens
            outputs = r.token_ids[n_prompt:]
            if outputs and outputs[-1] == PLACEHOLDER:
                outputs = outputs[:-1]
                pend_rows.append(i)
                pend_from.append(self._pending_row(r, prev))
            if p.repetition_penalty != 1.0:
                prompt_rows.extend([i] * n_prompt)
                prompt_ids.extend(r.token_ids[:n_prompt])
            out_rows.extend([i] * len(outputs))
            out_ids.extend(outputs)
        (f_dev,) = self.staging.upload("penalty_f32", [floats], torch.float32)
        arrays = [
            np.asarray(a, dtype=np.int64) for a in (prompt_rows, prompt_ids, out_rows, out_ids, pend_rows, pend_from)
        ]
        pr, pi, orows, oids, prow, pfrom = self.staging.upload("penalty_i64", arrays, torch.int64)
        if pend_rows:
            orows = torch.cat([orows, prow])
            oids = torch.cat([oids, _sampled_ids(prev).index_select(0, pfrom)])
        return PenaltyTensors(f_dev[0], f_dev[1], f_dev[2], pr, pi, orows, oids)

    def _sample(
        self, logits: torch.Tensor, targets: list[BatchRequest], step: int, prev: StepHandle | None = None
    ) -> StepHandle:
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for i, req in enumerate(targets):
            p = req.params
            if p.min_tokens and req.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(req.eos_token_ids))
                ban_rows.extend([i] * len(banned))
                ban_ids.extend(banned)
        raw = None
        penalties = self._penalty_tensors(targets, prev)
        if penalties is not None:
            # Raw logprobs are the model's; processed ones include the penalties and the bans.
            raw, logits = logits, apply_penalties(logits.float(), penalties)
        if ban_rows:
            if raw is None:
                raw, logits = logits, logits.clone()
            apply_token_bans(
                logits, torch.tensor(ban_rows, device=logits.device), torch.tensor(ban_ids, device=logits.device)
            )
        out = self.sampler(logits, self._sampling_tensors(targets), raw_logits=raw)
        n = len(targets)
        h = StepHandle(step, out.token_ids, want_logprobs=[r.params.logprobs is not None for r in targets])
        h.host_ids = self._to_host("ids", out.token_ids)
        if out.logprobs is not None and out.ranks is not None:
            h.host_logprobs = self._to_host("lps", out.logprobs.float())
            h.host_ranks = self._to_host("ranks", out.ranks)
        if out.top_token_ids is not None and out.top_logprobs is not None:
            h.top_k = [r.params.logprobs or 0 for r in targets]
            h.host_top_ids = self._to_host("top_ids", out.top_token_ids)
            h.host_top_logprobs = self._to_host("top_lps", out.top_logprobs.float())
        assert h.host_ids.shape[0] == n
        return h

    def _to_host(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """Start copying t into this step's pinned buffer for `key`; returns the host view."""
        if not self.staging.pinned:
            return t.clone()
        buf = self.staging.buffer(key, t.numel(), t.dtype)[: t.numel()].view(t.shape)
        buf.copy_(t, non_blocking=True)
        return buf


@contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to n for the block, then put back (None: unchanged). The
    count is process-wide, so it is restored before the step returns."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _copy_blocks(kv: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    src = torch.tensor([s for s, _ in pairs], device=kv.device)
    dst = torch.tensor([d for _, d in pairs], device=kv.device)
    kv[:, :, dst] = kv[:, :, src]


def _sampled_ids(prev: StepHandle | None) -> torch.Tensor:
    """The device token ids of the step in flight, which placeholder inputs are read from."""
    if prev is None or prev.token_ids is None:
        raise RuntimeError("a placeholder input token, but the step in flight sampled nothing")
    return prev.token_ids


def _block_tables(reqs: list[BatchRequest]) -> np.ndarray:
    """[rows, max blocks] int32, each row a request's block table padded with 0."""
    lens = np.fromiter((len(r.block_table) for r in reqs), dtype=np.int64, count=len(reqs))
    width = max(int(lens.max()), 1)
    tables = np.zeros((len(reqs), width), dtype=np.int32)
    flat = np.fromiter(
        itertools.chain.from_iterable(r.block_table for r in reqs), dtype=np.int32, count=int(lens.sum())
    )
    tables[np.arange(width)[None, :] < lens[:, None]] = flat
    return tables
