"""LLM: the offline API (vLLM-compatible where vLLM has the same thing).

vLLM's shapes that Tidal takes: prompt dicts (`{"prompt": ...}`, `{"prompt_token_ids": [...]}`),
`chat(messages)`, `get_tokenizer()`, `reset_prefix_cache()`, `sleep(level=1|2)` / `wake_up(tags)`
(docs/compatibility.md, "vLLM offline API").
"""

from __future__ import annotations

import queue
from collections.abc import Mapping, Sequence
from typing import Any, cast

from tqdm import tqdm

from tidal.config import EngineConfig
from tidal.engine import control_ops as ops
from tidal.engine.client import ControlAPI, InprocClient, wait_result
from tidal.engine.io import PromptInput, RequestState, check_prior_output_tokens, raise_for_error, unwrap_prompt
from tidal.engine.messages import AddRequest, EngineDead, EngineInvalidInput, EngineState
from tidal.outputs import RequestOutput
from tidal.sampling_params import SamplingParams

# sleep(level=...) as vLLM defines it: 1 offloads the weights to host memory and drops the KV
# cache; 2 drops both (Tidal re-reads the weights from their checkpoint on wake_up).
_SLEEP_LEVELS = {1: False, 2: True}  # level -> discard the weights
_ENGINE_FIELDS = frozenset(EngineConfig.__slots__)


def _engine_config(model: str | None, kwargs: dict[str, Any]) -> EngineConfig:
    """EngineConfig from LLM's keyword arguments; vLLM's with a Tidal meaning are mapped, any other
    unknown one is an error naming it."""
    kwargs = dict(kwargs)
    tp = kwargs.pop("tensor_parallel_size", 1)
    if tp != 1:
        raise ValueError(f"LLM(tensor_parallel_size={tp!r}) is invalid: expected 1 (Tidal runs one GPU per engine)")
    sleep_mode = kwargs.pop("enable_sleep_mode", True)
    if not isinstance(sleep_mode, bool):
        raise ValueError(
            f"LLM(enable_sleep_mode={sleep_mode!r}) is invalid: expected a bool (sleep is always available)"
        )
    unknown = sorted(set(kwargs) - _ENGINE_FIELDS)
    if unknown:
        raise ValueError(
            f"LLM() got unknown keyword arguments {unknown}: expected EngineConfig fields "
            f"{sorted(_ENGINE_FIELDS - {'model'})} (or tensor_parallel_size=1, enable_sleep_mode)"
        )
    return EngineConfig(model=model, **kwargs)


def _per_prompt_priors(value: int | Sequence[int], prompt_lens: list[int]) -> list[int]:
    """LLM.generate's prior_output_tokens, one checked entry per prompt."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != len(prompt_lens):
            raise EngineInvalidInput(
                "prior_output_tokens",
                list(value),
                f"one integer for every prompt, or a list of one per prompt ({len(prompt_lens)})",
            )
        values: list[object] = list(value)
    else:
        values = [value] * len(prompt_lens)
    return [check_prior_output_tokens(k, n) for k, n in zip(values, prompt_lens)]


class LLM(ControlAPI[dict[str, Any]]):
    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.config = _engine_config(model, engine_kwargs)
        self.engine = InprocClient(self.config)
        self.tokenizer = self.engine.tokenizer
        self._paused_for_sleep = False  # sleep(level=...) paused the engine: wake_up resumes it

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        request_ids: Sequence[str] | None = None,
        prior_output_tokens: int | Sequence[int] = 0,
    ) -> list[RequestOutput]:
        """`prior_output_tokens` (one for every prompt, or one per prompt): how many trailing
        tokens of the prompt are earlier output of this same sample, so that a sample cut after
        k tokens and continued over prompt + those k tokens samples as the uncut one would
        (seeded noise, presence/frequency penalties); budgets and outputs stay the request's own."""
        if isinstance(prompts, (str, Mapping)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        # a batch now: one text, token-id list or vLLM dict was wrapped just above
        prompts = [unwrap_prompt(p) for p in cast("Sequence[PromptInput]", prompts)]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(
                f"sampling_params has {len(params_list)} entries: expected one per prompt "
                f"({len(prompts)}) or a single SamplingParams"
            )
        ids = list(request_ids) if request_ids is not None else [self.engine.new_request_id() for _ in prompts]
        # Validate everything before anything is sent: a bad prompt changes no state.
        processed = [self.engine.input.process(p, sp) for p, sp in zip(prompts, params_list)]
        priors = _per_prompt_priors(prior_output_tokens, [len(toks) for _, toks in processed])
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        states = {
            rid: RequestState(rid, text, toks, sp, self.tokenizer)
            for rid, (text, toks), sp in zip(ids, processed, params_list)
        }
        for rid in ids:
            self.engine.register(rid, inbox.put)
        try:
            for rid, (_, toks), sp, k in zip(ids, processed, params_list, priors):
                # Offline: one output per sample when it finishes, no per-token traffic.
                self.engine.core.submit(AddRequest(rid, toks, sp, final_only=True, prior_output_tokens=k))
            self._collect(states, inbox, use_tqdm and len(ids) > 1)
        finally:
            for rid in ids:
                self.engine.unregister(rid)
        return [states[rid].output() for rid in ids]

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of them, rendered
        with the tokenizer's chat template (or `chat_template`), then generated."""
        if self.tokenizer is None:
            raise ValueError("chat: the model has no tokenizer, so no chat template: use generate with token ids")
        conversations: list[Any]  # each checked below
        if isinstance(messages, Sequence) and messages and isinstance(messages[0], Mapping):
            conversations = [messages]
        else:
            conversations = [*messages]
        if add_generation_prompt and continue_final_message:
            raise ValueError(
                "chat: add_generation_prompt=True and continue_final_message=True are invalid "
                "together: expected at most one of them"
            )
        extra = dict(chat_template_kwargs or {})
        clash = sorted(set(extra) & {"add_generation_prompt", "continue_final_message", "chat_template", "tokenize"})
        if clash:
            raise ValueError(f"chat_template_kwargs keys {clash} are invalid: expected them as chat() arguments")
        prompts = []
        for i, conv in enumerate(conversations):
            if not isinstance(conv, Sequence) or not all(isinstance(m, Mapping) for m in conv) or not conv:
                raise ValueError(f"messages[{i}] is invalid: expected a non-empty list of {{'role', 'content'}} dicts")
            ids = self.tokenizer.apply_chat_template(
                [dict(m) for m in conv],
                tokenize=True,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template=chat_template,
                **extra,
            )
            prompts.append(list(ids["input_ids"] if isinstance(ids, Mapping) else ids))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _collect(self, states: dict[str, RequestState], inbox: queue.SimpleQueue, progress: bool) -> None:
        pending = len(states)
        bar = tqdm(total=pending, desc="generate", unit="req", disable=not progress)
        try:
            while pending:
                try:
                    out = inbox.get(timeout=1.0)
                except queue.Empty:
                    if self.engine.core.state is EngineState.DEAD:
                        raise EngineDead(f"engine core died: {self.engine.core.error}") from None
                    continue
                st = states[out.request_id]
                was = st.finished
                st.apply(out)
                if out.error_type == "invalid_input":  # the whole call fails: stop the rest now
                    self.engine.submit(ops.Abort(request_ids=list(states)))
                    raise_for_error(st)
                if st.finished and not was:
                    pending -= 1
                    bar.update(1)
        finally:
            bar.close()

    # -- control (DESIGN.md §5): ControlAPI's methods over the inbox; vLLM's forms wrap them --
    def _control(self, op: ops.ControlOp, wait_s: float) -> dict[str, Any]:
        return wait_result(self.engine.submit(op), op, wait_s)

    def sleep(
        self,
        tags: Sequence[str] | int | None = None,
        discard: bool = False,
        timeout_s: float | None = None,
        *,
        level: int | None = None,
    ) -> dict[str, Any]:
        """Tidal's form: sleep(tags, discard) from `paused`. vLLM's form: sleep(level=1|2) (or
        sleep(1)) from anywhere: pauses first (offline, nothing is running between generate
        calls; anything that is ends with "abort"), then sleeps kv_cache and weights (level 2:
        discarded); wake_up resumes once nothing sleeps."""
        if isinstance(tags, bool):
            raise EngineInvalidInput("tags", tags, f"a list of tags from {list(ops.SLEEP_TAGS)}, or a sleep level")
        if isinstance(tags, int):
            tags, level = None, tags
        if level is None:
            return super().sleep(tags, discard, timeout_s)
        if level not in _SLEEP_LEVELS or tags is not None or discard:
            raise ValueError(f"sleep(level={level!r}) is invalid: expected level 1 or 2, without tags or discard")
        if _SLEEP_LEVELS[level] and self.engine.core.weight_source is None:
            raise ValueError(
                f"sleep(level={level}) is invalid for this model: its weights came from memory "
                "(load_format='dummy' or update_weights with tensors) and could not be re-read "
                "after being discarded; expected level=1"
            )
        paused_here = self.engine.core.state is EngineState.SERVING
        if paused_here:
            self.pause("abort", timeout_s)
        try:
            result = super().sleep(None, _SLEEP_LEVELS[level], timeout_s)
        except BaseException:
            if paused_here:  # nothing sleeps: serve again rather than hold every later request
                self.resume(timeout_s)
            raise
        self._paused_for_sleep = self._paused_for_sleep or paused_here
        return result

    def wake_up(self, tags: Sequence[str] | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        result = super().wake_up(tags, timeout_s)
        if self._paused_for_sleep and not result["sleeping"]:
            self.resume(timeout_s)
            self._paused_for_sleep = False
            result["state"] = "serving"
        return result

    def reset_prefix_cache(self, timeout_s: float | None = None) -> bool:
        """vLLM's name for flush_cache: forget every cached prefix block."""
        return bool(self.flush_cache(timeout_s)["flushed"])

    def shutdown(self) -> None:
        self.engine.shutdown()
