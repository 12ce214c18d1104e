"""ModelRunner: turns a ScheduledBatch into tensors, runs the model, samples on the device.

The only host sync per step is the copy of the sampled tokens (and their logprobs) back to
the CPU at the end of `execute`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tidal.attention.base import AttentionMetadata, get_backend
from tidal.config import EngineConfig
from tidal.engine.scheduler import SampledToken, ScheduledBatch
from tidal.models.loader import load_model
from tidal.runner.context import ForwardContext
from tidal.runner.sampler import Sampler, SamplingTensors, apply_token_bans


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # [num_targets] row in the flattened batch whose logits each target samples


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.model = load_model(model_path, self.dtype, self.device, config.load_format, config.seed)
        self.arch = self.model.arch
        self.max_model_len = min(config.max_model_len or self.arch.max_model_len, self.arch.max_model_len)
        self.block_size = config.block_size
        self.backend = get_backend(config.attention_backend)
        self.sampler = Sampler()
        self.num_blocks = config.num_kv_blocks or self._profile_num_blocks()
        self.kv_cache: torch.Tensor | None = None
        self.allocate_kv_cache()
        self.graphs = None  # CUDA-graph runner for decode, when enabled (GPU only)

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
            raise ValueError(f"KV cache does not fit: {budget / 2**20:.0f} MiB left for it, one block "
                             f"needs {self.kv_block_bytes / 2**20:.2f} MiB; lower max_num_batched_tokens "
                             f"or raise gpu_memory_utilization/kv_cache_memory_gb")
        return blocks

    def _activation_reserve(self) -> int:
        a = self.arch
        tokens = self.config.max_num_batched_tokens
        # logits for the sampled rows plus a generous per-token activation footprint
        return (self.config.max_num_seqs * a.vocab_size * 4 * 4
                + tokens * a.hidden_size * 4 * 16 + (512 << 20))

    def allocate_kv_cache(self) -> None:
        a = self.arch
        self.kv_cache = torch.zeros(a.num_layers, 2, self.num_blocks, self.block_size, a.num_kv_heads,
                                    a.head_dim, dtype=self.dtype, device=self.device)

    def free_kv_cache(self) -> None:
        self.kv_cache = None
        self.invalidate_graphs()

    def invalidate_graphs(self) -> None:
        """Captured graphs hold raw pointers to weights and the KV cache; drop them whenever
        either moves (sleep/wake)."""
        self.graphs = None

    # -- one step ------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        max_blocks = 1
        row_end = 0
        for req, n, group in zip(batch.reqs, batch.num_new_tokens, batch.sample_for):
            start = req.num_computed_tokens
            ids.extend(req.token_ids[start:start + n])
            pos = np.arange(start, start + n, dtype=np.int64)
            positions.append(pos)
            table = np.asarray(req.block_table, dtype=np.int64)
            slots.append(table[pos // bs] * bs + pos % bs)
            query_lens.append(n)
            seq_lens.append(start + n)
            max_blocks = max(max_blocks, len(req.block_table))
            row_end += n
            logits_rows.extend([row_end - 1] * len(group))
        tables = np.zeros((len(batch.reqs), max_blocks), dtype=np.int32)
        for i, req in enumerate(batch.reqs):
            tables[i, :len(req.block_table)] = req.block_table
        qsl = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl[1:])
        dev = self.device

        def to_dev(x: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(x)
            return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t

        meta = AttentionMetadata(
            slot_mapping=to_dev(np.concatenate(slots)),
            query_start_loc=to_dev(qsl),
            seq_lens=to_dev(np.asarray(seq_lens, dtype=np.int32)),
            block_tables=to_dev(tables),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return StepInputs(
            input_ids=to_dev(np.asarray(ids, dtype=np.int64)),
            positions=to_dev(np.concatenate(positions)),
            meta=meta,
            logits_rows=to_dev(np.asarray(logits_rows, dtype=np.int64)),
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampledToken]:
        assert self.kv_cache is not None, "forward pass while the KV cache is released (asleep)"
        if batch.blocks_to_copy:
            self._copy_blocks(batch.blocks_to_copy)
        inputs = self.prepare(batch)
        ctx = ForwardContext(inputs.meta, self.kv_cache, self.backend)
        if self.graphs is not None and self.graphs.can_run(inputs):
            hidden = self.graphs.run(inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        targets = batch.targets
        if not targets:
            return []
        logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_rows))
        return self._sample(logits, targets)

    def _sample(self, logits: torch.Tensor, targets: list) -> list[SampledToken]:
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for i, req in enumerate(targets):
            p = req.params
            if req.num_output_tokens < p.min_tokens:
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(req.eos_token_ids))
                ban_rows.extend([i] * len(banned))
                ban_ids.extend(banned)
        raw = logits
        if ban_rows:
            logits = logits.clone()
            apply_token_bans(logits, torch.tensor(ban_rows, device=logits.device),
                             torch.tensor(ban_ids, device=logits.device))
        t = SamplingTensors.build([r.params for r in targets], [r.seed for r in targets],
                                  [r.num_output_tokens for r in targets], logits.device)
        out = self.sampler(logits, t)
        if ban_rows and out.logprobs is not None:  # report logprobs of the model, not of the bans
            lse = torch.logsumexp(raw, dim=-1)
            out.logprobs = raw.gather(1, out.token_ids[:, None]).squeeze(1) - lse
        want_lp = [r.params.logprobs is not None for r in targets]
        ids = out.token_ids.tolist() if out.logprobs is None else None
        if ids is None:
            both = torch.stack([out.token_ids.double(), out.logprobs.double()], 1).cpu()
            ids = both[:, 0].long().tolist()
            lps = both[:, 1].tolist()
        else:
            lps = [None] * len(ids)
        tops: list[dict[int, float] | None] = [None] * len(ids)
        if out.top_token_ids is not None:
            top_ids = out.top_token_ids.cpu().tolist()
            top_lps = out.top_logprobs.cpu().tolist()
            for i, r in enumerate(targets):
                k = r.params.logprobs or 0
                if k > 0:
                    tops[i] = dict(zip(top_ids[i][:k], top_lps[i][:k]))
        return [SampledToken(tok, lp if want else None, top)
                for tok, lp, want, top in zip(ids, lps, want_lp, tops)]

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]
