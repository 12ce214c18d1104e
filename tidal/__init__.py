"""Tidal: rollout infrastructure for RL post-training of LLMs."""

from tidal.outputs import CompletionOutput, RequestOutput
from tidal.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy imports (torch, models) only when the engine is actually used.
    if name == "LLM":
        from tidal.engine.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from tidal.engine.async_llm import AsyncLLM

        return AsyncLLM
    if name == "EngineConfig":
        from tidal.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)


__all__ = ["LLM", "AsyncLLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
