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
    # vLLM's penalties (tidal/runner/sampler.py apply_penalties): repetition over prompt + output
    # tokens (1.0: off), presence and frequency over output tokens only (0.0: off).
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    include_stop_str_in_output: bool = False  # keep the matched stop string in `text`
    # None: off; 0: each prompt token's logprob given its prefix; k: plus the top-k (raw mode).
    prompt_logprobs: int | None = None

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
        _check(
            isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 0),
            "top_k",
            self.top_k,
            "-1 (disabled) or an integer >= 0",
        )
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "a float in [0, 1]")
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 0,
            "max_tokens",
            self.max_tokens,
            "an integer >= 0 (0: score the prompt, generate nothing)",
        )
        # max_tokens=0 is for scoring: without prompt logprobs it would compute nothing anyone gets
        # back, and n identical empty samples would have nothing to tell them apart.
        _check(
            self.max_tokens > 0 or self.prompt_logprobs is not None,
            "max_tokens",
            self.max_tokens,
            "an integer >= 1, or 0 together with prompt_logprobs (scoring only)",
        )
        _check(self.max_tokens > 0 or self.n == 1, "n", self.n, "1 when max_tokens=0 (nothing is sampled)")
        _check(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
            "min_tokens",
            self.min_tokens,
            f"an integer in [0, max_tokens={self.max_tokens}]",
        )
        _check(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
            "logprobs",
            self.logprobs,
            "None or an integer in [0, 20]",
        )
        _check(
            self.logprobs_mode in LOGPROBS_MODES,
            "logprobs_mode",
            self.logprobs_mode,
            "None (the engine's default), 'raw' or 'processed'",
        )
        _check(
            _is_number(self.repetition_penalty) and self.repetition_penalty > 0.0,
            "repetition_penalty",
            self.repetition_penalty,
            "a float > 0 (1.0: off)",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2.0 <= value <= 2.0, name, value, "a float in [-2, 2] (0.0: off)")
        _check(
            isinstance(self.include_stop_str_in_output, bool),
            "include_stop_str_in_output",
            self.include_stop_str_in_output,
            "a bool",
        )
        _check(
            self.prompt_logprobs is None
            or (
                isinstance(self.prompt_logprobs, int)
                and not isinstance(self.prompt_logprobs, bool)
                and 0 <= self.prompt_logprobs <= 20
            ),
            "prompt_logprobs",
            self.prompt_logprobs,
            "None or an integer in [0, 20]",
        )
        _check(self.seed is None or isinstance(self.seed, int), "seed", self.seed, "None or an integer")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "a list of non-empty strings")
        _check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            self.stop_token_ids,
            "a list of non-negative integers",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


class SamplingParamsError(ValueError):
    """A field of SamplingParams out of its range: carries the field, the value and what was
    expected, so a server can name the field without reading the message."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        super().__init__(f"SamplingParams.{field}={value!r} is invalid: expected {expected}")
        self.field, self.value, self.expected = field, value, expected


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise SamplingParamsError(name, value, expected)
