"""What the engine hands back: vLLM-shaped RequestOutput / CompletionOutput.

Logprobs are stored flat (what RL code reads: one float per token, `token_logprobs`) and offered
in vLLM's shape (`logprobs`: per token a dict token id -> Logprob) as a read-only view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Decoder = Callable[[int], str]  # token id -> its text (for Logprob.decoded_token)


@dataclass(slots=True)
class WeightSpan:
    """Tokens [start, end) of an output were produced under weight `version`."""

    version: int
    start: int
    end: int


@dataclass(slots=True)
class Logprob:
    """vLLM's per-token entry: rank 1 is the most likely token (1 + tokens strictly more likely)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def logprob_dicts(
    token_ids: Sequence[int],
    logprobs: Sequence[float | None],
    ranks: Sequence[int | None] | None,
    tops: Sequence[dict[int, float] | None] | None,
    decode: Decoder | None,
) -> list[dict[int, Logprob] | None]:
    """Per position {chosen token: Logprob, top-k tokens: Logprob}; None where logprobs[i] is None.
    The chosen token comes first; a top-k entry gets its place in the top-k as its rank."""
    out: list[dict[int, Logprob] | None] = []
    for i, (tok, lp) in enumerate(zip(token_ids, logprobs)):
        if lp is None:
            out.append(None)
            continue
        text = decode(tok) if decode is not None else None
        entry = {tok: Logprob(lp, ranks[i] if ranks else None, text)}
        for rank, (alt, alt_lp) in enumerate((tops[i] or {}).items() if tops else (), start=1):
            if alt not in entry:
                entry[alt] = Logprob(alt_lp, rank, decode(alt) if decode is not None else None)
        out.append(entry)
    return out


@dataclass(slots=True)
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    token_logprobs: list[float] | None = None  # one float per token (the sampled token's logprob)
    top_logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}, best first
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    weight_version: int = 0  # version of the latest token (the version at finish)
    weight_spans: list[WeightSpan] = field(default_factory=list)
    token_ranks: list[int] | None = None  # per token: 1 + tokens with a strictly higher logprob
    decode: Decoder | None = field(default=None, repr=False, compare=False)

    @property
    def logprobs(self) -> list[dict[int, Logprob]] | None:
        """vLLM's shape: per token {token_id: Logprob}, the sampled token first, then the top-k."""
        if self.token_logprobs is None:
            return None
        dicts = logprob_dicts(self.token_ids, self.token_logprobs, self.token_ranks, self.top_logprobs, self.decode)
        return [d for d in dicts if d is not None]  # none is None: every token has a logprob

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.token_logprobs is None else float(sum(self.token_logprobs))

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # With SamplingParams.prompt_logprobs: per prompt token its logprob given the tokens before
    # it (raw mode); the first token has no prefix, so its entry is None.
    prompt_token_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    prompt_token_ranks: list[int | None] | None = None
    decode: Decoder | None = field(default=None, repr=False, compare=False)

    @property
    def prompt_logprobs(self) -> list[dict[int, Logprob] | None] | None:
        """vLLM's shape: None for the first prompt token, then {token_id: Logprob} per token."""
        if self.prompt_token_logprobs is None:
            return None
        return logprob_dicts(
            self.prompt_token_ids,
            self.prompt_token_logprobs,
            self.prompt_token_ranks,
            self.prompt_top_logprobs,
            self.decode,
        )
