"""ModelArch: what the engine needs to know about a model, parsed from an HF config.json.

Reads the plain JSON dict (not a transformers config object), so the same parsing runs on
every transformers version. RoPE settings come either as transformers-5 ``rope_parameters``
or as the older ``rope_theta`` + ``rope_scaling`` pair.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(slots=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    # The rest of the rope_parameters dict (factor, original_max_position_embeddings, ...).
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ModelArch:
    architecture: str  # config.json `architectures[0]`, e.g. "Qwen3ForCausalLM"
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_model_len: int  # max_position_embeddings
    eos_token_ids: list[int]
    tie_word_embeddings: bool
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    bos_token_id: int | None = None
    pad_token_id: int | None = None


def as_config_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, dict):
        return hf_config
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"hf_config: expected a dict or a transformers config, got {type(hf_config).__name__}")


def _required(cfg: dict[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ValueError(f"config.json: missing required field {key!r}")
    return cfg[key]


def _positive_int(cfg: dict[str, Any], key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json: field {key!r} = {value!r}, expected a positive integer")
    return value


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def parse_rope(cfg: dict[str, Any]) -> RopeConfig:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json: rope_parameters = {params!r}, expected a dict")
    params = dict(params)
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"config.json: per-layer-type rope_parameters ({sorted(params)}) are not supported")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config.json: rope_type {rope_type!r} is not supported; expected one of {list(SUPPORTED_ROPE_TYPES)}"
        )
    theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    partial = params.pop("partial_rotary_factor", None) or cfg.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor = {partial!r} is not supported (expected 1.0)")
    if rope_type in ("linear", "dynamic", "llama3") and params.get("factor") is None:
        raise ValueError(f"config.json: rope_type {rope_type!r} needs a 'factor' in rope_parameters/rope_scaling")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if params.get(key) is None:
                raise ValueError(f"config.json: rope_type 'llama3' needs {key!r} in rope_parameters/rope_scaling")
    if rope_type in ("llama3", "yarn"):
        params.setdefault(
            "original_max_position_embeddings",
            cfg.get("original_max_position_embeddings") or cfg.get("max_position_embeddings"),
        )
    return RopeConfig(rope_type=rope_type, theta=theta, params=params)


def parse_arch(
    hf_config: Any,
    generation_config: dict[str, Any] | None = None,
    *,
    default_head_dim: int | None = None,
    default_max_len: int = 2048,
) -> ModelArch:
    """Common Llama-family fields; the model classes set their bias / norm flags on top."""
    cfg = as_config_dict(hf_config)
    architecture = (cfg.get("architectures") or ["?"])[0]
    hidden_act = cfg.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"config.json: hidden_act = {hidden_act!r}, only 'silu' is supported")
    hidden = _positive_int(cfg, "hidden_size", _required(cfg, "hidden_size"))
    heads = _positive_int(cfg, "num_attention_heads", _required(cfg, "num_attention_heads"))
    kv_heads = _positive_int(cfg, "num_key_value_heads", cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ValueError(
            f"config.json: num_attention_heads = {heads} is not a multiple of num_key_value_heads = {kv_heads}"
        )
    head_dim = cfg.get("head_dim") or default_head_dim or hidden // heads
    eos = _token_ids((generation_config or {}).get("eos_token_id"))
    eos += [t for t in _token_ids(cfg.get("eos_token_id")) if t not in eos]
    return ModelArch(
        architecture=architecture,
        num_layers=_positive_int(cfg, "num_hidden_layers", _required(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_positive_int(cfg, "head_dim", head_dim),
        hidden_size=hidden,
        vocab_size=_positive_int(cfg, "vocab_size", _required(cfg, "vocab_size")),
        max_model_len=_positive_int(
            cfg, "max_position_embeddings", cfg.get("max_position_embeddings") or default_max_len
        ),
        eos_token_ids=eos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        intermediate_size=_positive_int(cfg, "intermediate_size", _required(cfg, "intermediate_size")),
        rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
        rope=parse_rope(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )


def read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_hf_config(model_dir: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config.json, generation_config.json or None) of a model directory."""
    if not os.path.isdir(model_dir):
        raise ValueError(f"model directory {model_dir!r} does not exist or is not a directory")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"model directory {model_dir!r} has no config.json")
    cfg = read_json(path, "config.json")
    gen_path = os.path.join(model_dir, "generation_config.json")
    gen = read_json(gen_path, "generation_config.json") if os.path.isfile(gen_path) else None
    return cfg, gen
