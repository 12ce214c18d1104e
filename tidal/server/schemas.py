"""Request bodies of the HTTP API (pydantic), validated before anything reaches the engine.

Numbers are bounded (no NaN, no infinities, no integers the wire cannot carry) and every known
field is checked strictly (no bool or string where a number belongs, no number where a string
does), so bad input gets a 400 naming the field instead of an error deeper down.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

_I32 = 2**31 - 1
_I63 = 2**63 - 1

PosInt = Annotated[int, Field(ge=1, le=_I32)]
NonNegInt = Annotated[int, Field(ge=0, le=_I32)]
TokenId = Annotated[int, Field(ge=0, le=_I32)]
Seed = Annotated[int, Field(ge=0, le=_I63)]
Timeout = Annotated[float, Field(ge=0.1, le=7 * 86400)]  # a deadline for the reply
DrainTimeout = Annotated[float, Field(ge=0.0, le=7 * 86400)]  # how long a drain may last
RequestId = Annotated[str, Field(min_length=1, max_length=256)]
LogprobsMode = Literal["raw", "processed"]  # docs/numerics.md
StopList = Annotated[list[Annotated[str, Field(min_length=1, max_length=1024)]], Field(max_length=64)]


class _Body(BaseModel):
    # Unknown fields are ignored (OpenAI clients send extras); known ones are checked strictly.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _OpenAIBody(_Body):
    # Extra fields are kept (not dropped) so the route can name each one: accepted-and-ignored
    # ones are listed in docs/compatibility.md, every other one is a 400 (no silent ignores).
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


class _SamplingFields(_OpenAIBody):
    """OpenAI sampling fields plus vLLM's and Tidal's extensions (DESIGN.md §6)."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=1e4)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: str | StopList | None = None
    seed: Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted, ignored (docs say why)
    tools: list[dict] | None = None  # only null or [] (no tool parser)
    tool_choice: str | dict | None = None  # only null or "none"
    response_format: dict | None = None  # only {"type": "text"}
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1, le=_I32)] = -1
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    min_tokens: NonNegInt = 0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    ignore_eos: StrictBool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=1024)] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    return_tokens_as_token_ids: StrictBool = False
    return_token_ids: StrictBool = False
    # Tidal's
    logprobs_mode: LogprobsMode | None = None
    request_id: RequestId | None = None


class CompletionRequest(_SamplingFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1024)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=1024)]
    )
    max_tokens: NonNegInt | None = 16  # 0: score the prompt only (with echo / prompt_logprobs)
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(max_length=1024)] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_tokens: PosInt | None = None
    max_completion_tokens: PosInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: StrictBool = True


class _SGLangBody(BaseModel):
    # SGLang's /generate: an unknown field is refused (400 naming it), never silently dropped.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class GenerateSamplingParams(_SGLangBody):
    """SGLang's sampling_params names, plus Tidal's (`max_tokens`, `seed`, `min_tokens`,
    `logprobs`, `logprobs_mode`); an alias pair given together is a 400."""

    max_new_tokens: NonNegInt | None = None
    max_tokens: NonNegInt | None = None  # Tidal's name for max_new_tokens
    min_new_tokens: NonNegInt | None = None
    min_tokens: NonNegInt | None = None  # Tidal's name for min_new_tokens
    n: Annotated[int, Field(ge=1, le=128)] = 1
    temperature: Annotated[float, Field(ge=0.0, le=1e4)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=_I32)] = -1
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    sampling_seed: Seed | None = None
    seed: Seed | None = None  # Tidal's name for sampling_seed
    stop: str | StopList | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=1024)] | None = None
    ignore_eos: StrictBool = False
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    no_stop_trim: StrictBool = False
    repetition_penalty: Annotated[float, Field(gt=0.0, le=1e4)] = 1.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # Tidal's: top-k per output token
    logprobs_mode: LogprobsMode | None = None


TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]
Batch = Field(min_length=1, max_length=1024)


class GenerateRequest(_SGLangBody):
    """SGLang's GenerateReqInput: exactly one of `text` and `input_ids`, each one prompt or a
    batch (400 otherwise, param `input_ids`). A batch, or n > 1, answers a list."""

    text: Text | Annotated[list[Text], Batch] | None = None
    input_ids: TokenIds | Annotated[list[TokenIds], Batch] | None = None
    sampling_params: GenerateSamplingParams | Annotated[list[GenerateSamplingParams], Batch] = Field(
        default_factory=GenerateSamplingParams
    )
    rid: RequestId | Annotated[list[RequestId], Batch] | None = None
    request_id: RequestId | None = None  # Tidal's name for rid
    return_logprob: StrictBool = True  # SGLang's default is false; Tidal's is true
    logprob_start_len: Annotated[int, Field(ge=-1, le=_I32)] = -1
    top_logprobs_num: Annotated[int, Field(ge=0, le=20)] = 0
    return_text_in_logprobs: StrictBool = False
    stream: StrictBool = False
    incremental_streaming_output: StrictBool = False  # per request, SGLang's server flag
    log_metrics: StrictBool = True  # accepted and ignored (docs/compatibility.md)
    timeout_s: Timeout | None = None
    # Tidal's: how many trailing tokens of the prompt (each prompt, or one per prompt) are
    # earlier output of this same sample; a continuation then samples as the uncut one would.
    prior_output_tokens: NonNegInt | Annotated[list[NonNegInt], Batch] = 0
    # What sglang-router (and SGLang's own clients) send at their defaults: accepted at those
    # values, refused otherwise (Tidal has no hidden states, byte outputs, entropy or background jobs).
    model: str | None = None  # checked against the served model name
    return_hidden_states: Literal[False] = False
    return_bytes: Literal[False] = False
    return_entropy: Literal[False] = False
    background: Literal[False] = False
    no_logs: StrictBool = False  # accepted: Tidal logs no request content


# -- control ---------------------------------------------------------------------------------
class PauseRequest(_Body):
    """The same options may come as query parameters instead (`POST /v1/pause?mode=keep`), not both."""

    mode: Literal["abort", "retract", "keep", "drain"] = "abort"
    timeout_s: DrainTimeout | None = None


class ControlRequest(_Body):
    timeout_s: Timeout | None = None


class AbortRequest(_Body):
    """Exactly one of `request_ids` and `abort_all=true` is given (400 otherwise, param `request_ids`)."""

    request_ids: Annotated[list[RequestId], Field(max_length=100_000)] | None = None
    abort_all: StrictBool = False
    timeout_s: Timeout | None = None


class SleepRequest(_Body):
    tags: list[Literal["kv_cache", "weights"]] | None = None
    discard: StrictBool = False
    timeout_s: Timeout | None = None


class WakeUpRequest(_Body):
    tags: list[Literal["kv_cache", "weights"]] | None = None
    timeout_s: Timeout | None = None


class UpdateWeightsRequest(_Body):
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    version: Annotated[int, Field(ge=0, le=_I63)] | None = None
    checksums: dict[str, Annotated[str, Field(min_length=64, max_length=64)]] | None = None
    timeout_s: Timeout | None = None
    # "in_place" when a second copy of the weights does not fit (generation is held while it writes)
    staging: Literal["copy", "in_place"] = "copy"
