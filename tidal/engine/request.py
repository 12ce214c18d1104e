"""A request as the core loop sees it: one sequence (one of the `n` samples of a prompt)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tidal.outputs import WeightSpan
from tidal.runner.batch import PLACEHOLDER
from tidal.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tidal.engine.detokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)  # identity semantics: requests are compared and hashed by object
class Request:
    request_id: str  # the user's id; the `n` samples of a prompt share it
    index: int  # which of the n samples this sequence is
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # per-sample seed (derived from params.seed, or drawn by the engine)
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 1 << 30
    # The last K prompt tokens are earlier output of this same sample (a continuation after a
    # move): the sampler's step index and presence/frequency penalties count them as output;
    # max_tokens, min_tokens and the outputs reported count only this request's own tokens.
    prior_output_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # prompt + output, grows as we decode
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    output_ranks: list[int] = field(default_factory=list)
    # SamplingParams.prompt_logprobs: entries for prompt tokens 1.. (token 0 has no prefix),
    # filled chunk by chunk as the prefill runs (computed by sample 0 only).
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_ranks: list[int] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache at first admission
    weight_spans: list[WeightSpan] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already registered in the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # Samples 1..n-1 of a prompt wait here until sample 0 finishes the prompt's prefill; then they
    # fork from it, sharing its blocks (see Scheduler.update).
    pending_forks: list[Request] = field(default_factory=list)
    num_preemptions: int = 0
    detokenizer: IncrementalDetokenizer | None = None  # only for requests with stop strings
    num_sent_tokens: int = 0  # outputs already handed to the output path
    final_only: bool = False  # one output, when finished (no per-token deltas)
    # Overlap scheduling (see EngineCore.step): a sampled token whose step is still on the device
    # sits at the end of `token_ids` as PLACEHOLDER until the step is resolved. At most two are
    # pending (the step being resolved and the one launched ahead of it).
    num_pending: int = 0
    pending_row: int = -1  # row of the newest placeholder in its step's sampled tokens
    pending_step: int = -1  # which step that is
    num_prompt_tokens: int = field(init=False, default=0)  # the prompt never changes

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_resolved_output_tokens(self) -> int:
        """Output tokens whose values are known (placeholders excluded)."""
        return len(self.token_ids) - self.num_prompt_tokens - self.num_pending

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Sample 0 of a request asking for prompt logprobs, until it has them all."""
        return (
            self.index == 0
            and self.params.prompt_logprobs is not None
            and len(self.prompt_logprobs) < self.num_prompt_tokens - 1
        )

    @property
    def scoring_only(self) -> bool:
        """max_tokens=0: the request ends when its prompt is computed, nothing is sampled."""
        return self.params.max_tokens == 0

    def add_prompt_logprobs(self, logprobs: list[float], ranks: list[int], tops: list[dict[int, float]] | None) -> None:
        self.prompt_logprobs.extend(logprobs)
        self.prompt_ranks.extend(ranks)
        if tops is not None:
            self.prompt_top_logprobs.extend(tops)

    def ends_by_length(self, num_output_tokens: int) -> bool:
        """Whether a request with this many output tokens is done: max_tokens or the model's length."""
        return (
            num_output_tokens >= self.params.max_tokens
            or self.num_prompt_tokens + num_output_tokens >= self.max_model_len
        )

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_placeholder(self, row: int, step: int) -> None:
        """Reserve the slot of a token sampled by a step that is still running on the device."""
        self.token_ids.append(PLACEHOLDER)
        self.num_pending += 1
        self.pending_row, self.pending_step = row, step

    def drop_placeholders(self) -> None:
        if self.num_pending:
            del self.token_ids[-self.num_pending :]
            self.num_pending = 0

    def append_token(
        self,
        token_id: int,
        logprob: float | None,
        top: dict[int, float] | None,
        weight_version: int,
        rank: int | None = None,
    ) -> None:
        """Record a sampled token: it fills the oldest placeholder if there is one."""
        n = self.num_resolved_output_tokens
        if self.num_pending:
            self.token_ids[self.num_prompt_tokens + n] = token_id
            self.num_pending -= 1
        else:
            self.token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if top is not None:
            self.output_top_logprobs.append(top)
        if rank is not None:
            self.output_ranks.append(rank)
        if self.weight_spans and self.weight_spans[-1].version == weight_version:
            self.weight_spans[-1].end = n + 1
        else:
            self.weight_spans.append(WeightSpan(weight_version, n, n + 1))
