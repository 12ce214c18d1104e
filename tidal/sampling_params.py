"""Per-request sampling parameters (the vLLM vocabulary), validated at construction."""
from __future__ import annotations

from dataclasses import dataclass, field

LOGPROBS_MODES = (None, "raw", "processed")


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; 0: sampled token only; k: plus top-k
    skip_special_tokens: bool = True
    # "raw" | "processed" (docs/numerics.md); None: the engine's EngineConfig.logprobs_mode.
    logprobs_mode: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(self.temperature >= 0.0, "temperature", self.temperature, "a float >= 0")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "a float in (0, 1]")
        _check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
               "top_k", self.top_k, "-1 (disabled) or an integer >= 0")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "a float in [0, 1]")
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
               "max_tokens", self.max_tokens, "an integer >= 1")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens", self.min_tokens, f"an integer in [0, max_tokens={self.max_tokens}]")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
               "logprobs", self.logprobs, "None or an integer in [0, 20]")
        _check(self.logprobs_mode in LOGPROBS_MODES, "logprobs_mode", self.logprobs_mode,
               "None (the engine's default), 'raw' or 'processed'")
        _check(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "None or an integer")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "a list of non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "a list of non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: expected {expected}")
