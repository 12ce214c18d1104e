"""Llama-family decoder-only causal LMs: Llama, Qwen2 (qkv bias), Qwen3 (q/k RMSNorm).

One implementation; the subclasses only differ in how they read config.json. q/k/v are one
``qkv_proj`` and gate/up one ``gate_up_proj``; checkpoint names (HF's q_proj, k_proj, ...)
map onto row slices of them (see ``_build_weight_map``).

Invariant: the forward never syncs with the host (no .item(), no loops over tokens), so a
decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tidal.attention.context import ForwardContext
from tidal.kernels.fused import FusedOps
from tidal.models.config import ModelArch, as_config_dict, parse_arch
from tidal.models.layers import Embedding, Linear, RMSNorm, RopeInputs, RotaryEmbedding, apply_rope

# Checkpoint tensors that carry no weights (buffers saved by old exports); accepted and skipped.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        self.scale = arch.head_dim**-0.5
        self.qkv_proj = Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, arch.qkv_bias, dtype)
        self.o_proj = Linear(self.q_size, arch.hidden_size, arch.o_bias, dtype)
        if arch.qk_norm:
            self.q_norm: RMSNorm | None = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)
            self.k_norm: RMSNorm | None = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.fused: FusedOps | None = None  # tidal.kernels.fused.use_fused_kernels

    def forward(self, x: torch.Tensor, rope: RopeInputs, ctx: ForwardContext) -> torch.Tensor:
        T, Hq = x.shape[0], self.num_heads
        qkv = self.qkv_proj(x)
        # q and k side by side as [T, Hq + Hkv, D] so RoPE runs once over both; the attention
        # backends take strided q/k/v (contiguous head_dim only), so no copies are needed.
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        qn, kn = self.q_norm, self.k_norm
        if self.fused is not None:
            qk = self.fused.qk_norm_rope(
                qkv,
                Hq,
                self.num_kv_heads,
                self.head_dim,
                rope.positions,
                rope.table,
                None if qn is None else qn.weight,
                None if kn is None else kn.weight,
                0.0 if qn is None else qn.eps,
            )
        else:
            qk = qkv[:, : self.q_size + self.kv_size].view(T, Hq + self.num_kv_heads, self.head_dim)
            if qn is not None and kn is not None:
                qk = torch.cat([qn(qk[:, :Hq]), kn(qk[:, Hq:])], dim=1)
            qk = apply_rope(qk, *rope.cos_sin())
        o = ctx.attend(self.layer_idx, qk[:, :Hq], qk[:, Hq:], v, self.scale)
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype):
        super().__init__()
        self.intermediate_size = arch.intermediate_size
        self.gate_up_proj = Linear(arch.hidden_size, 2 * arch.intermediate_size, arch.mlp_bias, dtype)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, arch.mlp_bias, dtype)
        self.fused: FusedOps | None = None  # tidal.kernels.fused.use_fused_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused is not None:
            return self.down_proj(self.fused.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.self_attn = Attention(arch, layer_idx, dtype)
        self.mlp = MLP(arch, dtype)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor | None, rope: RopeInputs, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = h
            h = self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, rope, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, dtype) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(arch.rope, arch.head_dim, arch.max_model_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        rope = self.rotary_emb(positions)
        h, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, residual = layer(h, residual, rope, ctx)
        h, _ = self.norm(h, residual)
        return h


@dataclass(slots=True)
class _Slot:
    """Where one checkpoint tensor lands: rows [start, start+size) of ``param`` (all rows if size is None)."""

    param: nn.Parameter
    start: int = 0
    size: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        rows = self.param.shape[0] if self.size is None else self.size
        return (rows, *self.param.shape[1:])


class LlamaForCausalLM(nn.Module):
    arch: ModelArch
    lm_head_dtype: torch.dtype | None = None  # None: the model's dtype (EngineConfig.lm_head_dtype)

    def __init__(self, arch: ModelArch, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.arch = arch
        self.dtype = dtype
        self.model = DecoderModel(arch, dtype)
        tied = self.model.embed_tokens.weight if arch.tie_word_embeddings else None
        self.lm_head = Linear(arch.hidden_size, arch.vocab_size, False, dtype, weight=tied)
        self._weight_map = self._build_weight_map()

    # ---- config -----------------------------------------------------------------------
    @classmethod
    def arch_from_config(cls, hf_config: Any, generation_config: dict[str, Any] | None = None) -> ModelArch:
        cfg = as_config_dict(hf_config)
        arch = parse_arch(cfg, generation_config)
        bias = bool(cfg.get("attention_bias", False))
        return replace(arch, qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))

    # ---- forward ----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> hidden states [T, hidden_size]."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] -> [N, vocab_size] float32. With lm_head_dtype float32 the projection
        itself runs in float32 (hidden states and weights upcast), not only its output."""
        if self.lm_head_dtype == torch.float32:
            return self.lm_head.forward_fp32(hidden)
        return self.lm_head(hidden).float()

    # ---- weights ----------------------------------------------------------------------
    def _build_weight_map(self) -> dict[str, _Slot]:
        a = self.arch
        q, kv, inter = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size
        fused = {
            "self_attn.qkv_proj": [
                ("self_attn.q_proj", 0, q),
                ("self_attn.k_proj", q, kv),
                ("self_attn.v_proj", q + kv, kv),
            ],
            "mlp.gate_up_proj": [("mlp.gate_proj", 0, inter), ("mlp.up_proj", inter, inter)],
        }
        slots: dict[str, _Slot] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            if name == "lm_head.weight" and a.tie_word_embeddings:
                slots[name] = _Slot(param)  # same storage as embed_tokens; optional in checkpoints
                continue
            prefix, _, leaf = name.rpartition(".")
            for fused_name, parts in fused.items():
                if prefix.endswith(fused_name):
                    base = prefix[: -len(fused_name)]
                    for hf_name, start, size in parts:
                        slots[f"{base}{hf_name}.{leaf}"] = _Slot(param, start, size)
                    break
            else:
                slots[name] = _Slot(param)
        return slots

    def optional_weights(self) -> set[str]:
        """Names in ``weight_specs`` a checkpoint may leave out."""
        return {"lm_head.weight"} if self.arch.tie_word_embeddings else set()

    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: (slot.shape, self.dtype) for name, slot in self._weight_map.items()}

    def check_weight_spec(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Like ``check_weight`` from shape and dtype alone (e.g. a safetensors header)."""
        if name.endswith(IGNORED_SUFFIXES):
            return
        slot = self._weight_map.get(name)
        if slot is None:
            raise ValueError(
                f"checkpoint tensor {name!r} (shape {list(shape)}) is not a weight of "
                f"{self.arch.architecture}; expected names like 'model.layers.0.self_attn.q_proj.weight'"
            )
        if tuple(shape) != slot.shape:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {list(shape)}, expected {list(slot.shape)} "
                f"for {self.arch.architecture} as config.json describes it"
            )
        if not (dtype.is_floating_point):
            raise ValueError(
                f"checkpoint tensor {name!r} has dtype {dtype}, expected a floating-point "
                f"dtype (it is cast to {self.dtype})"
            )

    def check_weight(self, name: str, tensor: torch.Tensor) -> None:
        self.check_weight_spec(name, tuple(tensor.shape), tensor.dtype)

    def live_view(self, name: str) -> torch.Tensor | None:
        """The live storage a checkpoint tensor is copied into (a slice of a fused parameter);
        None for buffers the model ignores. Call check_weight first."""
        if name.endswith(IGNORED_SUFFIXES):
            return None
        slot = self._weight_map[name]
        return slot.param if slot.size is None else slot.param.narrow(0, slot.start, slot.size)

    def weight_slot(self, name: str) -> tuple[nn.Parameter, int, int] | None:
        """(parameter, first row, rows) a checkpoint tensor fills; None for buffers the model
        ignores. Call check_weight first. Tied names share one parameter object."""
        if name.endswith(IGNORED_SUFFIXES):
            return None
        slot = self._weight_map[name]
        return slot.param, slot.start, slot.shape[0]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy tensors into the parameters, casting to the model dtype; each tensor is checked
        before it is copied. Returns the names loaded (ignored buffers excluded)."""
        loaded: set[str] = set()
        for name, tensor in weights:
            self.check_weight(name, tensor)
            view = self.live_view(name)
            if view is None:  # a buffer the model ignores
                continue
            view.copy_(tensor)
            loaded.add(name)
        return loaded


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch_from_config(cls, hf_config, generation_config=None):
        cfg = as_config_dict(hf_config)
        if cfg.get("use_sliding_window"):
            raise ValueError(
                "config.json: use_sliding_window = true is not supported for Qwen2 "
                "(sliding-window attention); expected false"
            )
        arch = parse_arch(cfg, generation_config, default_max_len=32768)
        return replace(arch, qkv_bias=True, o_bias=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def arch_from_config(cls, hf_config, generation_config=None):
        cfg = as_config_dict(hf_config)
        if cfg.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window = true is not supported for Qwen3; expected false")
        arch = parse_arch(cfg, generation_config, default_head_dim=128, default_max_len=32768)
        bias = bool(cfg.get("attention_bias", False))
        return replace(arch, qkv_bias=bias, o_bias=bias, qk_norm=True)
