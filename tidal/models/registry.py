"""Architecture name (config.json ``architectures``) -> model class."""

from __future__ import annotations

from typing import Any

from tidal.models.config import as_config_dict
from tidal.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

# Each class has LlamaForCausalLM's interface (arch, load_weights, live_view): the loader uses it.
_MODELS: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def register_model(architecture: str, cls: type[LlamaForCausalLM]) -> None:
    _MODELS[architecture] = cls


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(hf_config: Any) -> type[LlamaForCausalLM]:
    """The class for the first supported name in ``architectures`` (a config dict or a
    transformers config object)."""
    archs = as_config_dict(hf_config).get("architectures")
    if not archs:
        raise ValueError(
            f"config.json: `architectures` is {archs!r}; expected a list naming one of {supported_architectures()}"
        )
    for name in archs:
        if name in _MODELS:
            return _MODELS[name]
    raise ValueError(f"config.json: architectures = {archs!r} is not supported; supported: {supported_architectures()}")
