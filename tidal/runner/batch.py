"""What the runner consumes from the scheduler: a batch of rows and, back, one sampled token per
target. The runner sees requests only through `BatchRequest`, so it depends on no engine module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tidal.sampling_params import SamplingParams

PLACEHOLDER = -1  # token id of a sampled token not yet copied back from the device


class BatchRequest(Protocol):
    """The fields of a request that the runner reads; it writes none (its caches are its own)."""

    request_id: str
    params: SamplingParams
    seed: int
    eos_token_ids: tuple[int, ...]
    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    num_pending: int
    pending_row: int
    pending_step: int
    num_prompt_tokens: int
    prior_output_tokens: int  # trailing prompt tokens that are earlier output of the sample
    prompt_logprobs: list[float]

    @property
    def num_output_tokens(self) -> int: ...

    @property
    def needs_prompt_logprobs(self) -> bool: ...


R = TypeVar("R", bound=BatchRequest)


@dataclass(slots=True)
class ScheduledBatch(Generic[R]):
    reqs: list[R] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    # Per row: the requests whose next token is sampled from this row's last logits. Empty
    # while a prefill is mid-way; [req] normally; [req, *forks] when an n-sample prompt
    # finishes its prefill.
    sample_for: list[list[R]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    scored: list[R] = field(default_factory=list)  # scoring requests (max_tokens=0) this step completes
    needs_sync: bool = False  # a lookahead schedule stopped early: resolve before the next one

    def __len__(self) -> int:
        return len(self.reqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def targets(self) -> list[R]:
        return [r for group in self.sample_for for r in group]


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None
    top_logprobs: dict[int, float] | None
    rank: int | None = None  # 1 + tokens with a strictly higher logprob (with logprobs only)


@dataclass(slots=True)
class PromptLogprobs:
    """One step's prompt logprobs for one batch row: tokens in order, continuing the request's."""

    logprobs: list[float]
    ranks: list[int]
    top_logprobs: list[dict[int, float]] | None
