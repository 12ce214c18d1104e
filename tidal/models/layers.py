"""Building blocks shared by the decoder models: RMSNorm, linear layers, rotary embedding.

Parameters are created uninitialised (``torch.empty``) and without autograd; the loader
fills them from a checkpoint or with random values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tidal.kernels.fused import FusedOps
from tidal.kernels.matmul import matmul
from tidal.models.config import RopeConfig


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b). Fused projections (qkv, gate_up) are one Linear whose rows the
    loader fills slice by slice.

    batch_invariant (set by `set_batch_invariant`): every row's result is independent of how many
    rows there are. BLAS libraries pick their blocking from the number of rows M (on this CPU's
    MKL, rows in the last partial micro-tile and M < 4 take other code paths, with another
    summation order), so on the CPU the rows are padded to a multiple of ROW_TILE: every row then
    sits in a full tile. On CUDA, cuBLAS picks whole kernels (and split-K) by M, so the product is
    the fixed-configuration Triton kernel of tidal.kernels.matmul instead.
    """

    ROW_TILE = 16
    batch_invariant = False
    # Set by `set_cpu_prepack`: float32 products on the CPU go through oneDNN with the weight
    # reordered once into its blocked layout (a second copy of W, rebuilt when W changes). Measured
    # (benchmarks/README.md, "CPU"): 1.15-1.3x MKL's F.linear at 8-128 rows on weights of 1M
    # elements or more; on a Zen 4 VM also on the 128K-512K-element projections of a 256-wide model
    # (1.0-1.7x per call at 16-2,048 rows; a decode step's linears 0.67 -> 0.37-0.47 s per run of
    # vs_vllm_cpu's long workload); on smaller weights (256 x 256) plain F.linear is as fast. At 2-7
    # rows, timed as a model's whole set of linears one after another (each weight cold, as in a
    # decode step), oneDNN is 1.4-2.4x F.linear; at one row (single-stream decode) it is ~1.9x on
    # weights below PREPACK_ONE_ROW_MAX_WEIGHT (a 256-wide model's) and ~12% slower on larger ones,
    # which both then stream from memory (benchmarks/README.md, CPU, session 10).
    cpu_prepack = False
    PREPACK_MIN_ROWS = 2
    PREPACK_MIN_WEIGHT = 1 << 17
    PREPACK_ONE_ROW_MAX_WEIGHT = 1 << 20

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, weight: nn.Parameter | None = None
    ):
        super().__init__()
        # ``weight`` shares an existing parameter (tied embeddings).
        self.weight = _param(out_features, in_features, dtype=dtype) if weight is None else weight
        self.bias = _param(out_features, dtype=dtype) if bias else None
        self._fp32: tuple[tuple[int, int], torch.Tensor, torch.Tensor | None] | None = None
        self._packed: tuple[tuple[int, int], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(x, self.weight, self.bias)

    def forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T (+ b) with x, W and b in float32 (the fp32 LM head). The fp32 copy of W is kept
        until W changes: the key is W's storage and version counter, which in-place weight
        updates (copy_) bump."""
        w = self.weight
        if w.dtype == torch.float32:
            return self._project(x.float(), w, self.bias)
        key = (w.data_ptr(), w._version)
        if self._fp32 is None or self._fp32[0] != key:
            self._fp32 = None  # free the stale copy before making the new one
            self._fp32 = (key, w.float(), None if self.bias is None else self.bias.float())
        _, w32, b32 = self._fp32
        return self._project(x.float(), w32, b32)

    def drop_derived(self) -> None:
        """Free the copies derived from W (the fp32 copy, the prepacked one): sleep, or W replaced
        by other means than an in-place write. Each is rebuilt on next use."""
        self._fp32 = None
        self._packed = None

    def _project(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if not self.batch_invariant or x.dim() != 2:
            if self.cpu_prepack and w.dtype == torch.float32 and self._packs(x.numel() // x.shape[-1], w.numel()):
                return self._prepacked(x, w, b)
            return F.linear(x, w, b)
        if x.is_cuda:
            return matmul(x, w, b)
        return invariant_linear(x, w, b, self.ROW_TILE)

    def _packs(self, rows: int, weight_numel: int) -> bool:
        """Whether a float32 CPU product of `rows` rows with a weight of `weight_numel` elements
        goes through oneDNN on the prepacked weight."""
        if weight_numel < self.PREPACK_MIN_WEIGHT:
            return False
        return rows >= self.PREPACK_MIN_ROWS or (rows == 1 and weight_numel < self.PREPACK_ONE_ROW_MAX_WEIGHT)

    def _prepacked(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        # Keyed like the fp32 copy: W's storage and version counter (in-place updates bump it).
        key = (w.data_ptr(), w._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = None
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w, None))
        return torch.ops.mkldnn._linear_pointwise(x, self._packed[1], b, "none", [], "")


def invariant_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tile: int) -> torch.Tensor:
    """F.linear on the CPU whose row i depends only on x[i]: rows padded to whole tiles of `tile`."""
    rows = x.shape[0]
    padded = max(tile, -(-rows // tile) * tile)
    if padded != rows:
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
    return F.linear(x, w, b)[:rows]


def set_batch_invariant(model: nn.Module, on: bool) -> None:
    """Switch every Linear of `model` to (or from) its batch-invariant path. (Norms, activations and
    RoPE need no switch: per-row reductions and element-wise ops are row-invariant on the CPU, as
    tests/runner/test_numerics_invariance.py checks, and on CUDA the mode runs the fused kernels of
    tidal.kernels.fused, one program per row, which EngineConfig requires there.)"""
    for m in model.modules():
        if isinstance(m, Linear):
            m.batch_invariant = on


def set_cpu_prepack(model: nn.Module, on: bool) -> None:
    """Switch every Linear of `model` to (or from) oneDNN products with prepacked weights (CPU,
    float32; the batch-invariant path keeps F.linear on padded tiles)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.cpu_prepack = on
            if not on:
                m.drop_derived()


def drop_derived_weights(model: nn.Module) -> None:
    """Free every Linear's copies derived from its weight (see Linear.drop_derived)."""
    for m in model.modules():
        if isinstance(m, Linear):
            m.drop_derived()


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _param(num_embeddings, dim, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in float32. With ``residual`` the add
    happens first and the sum is returned as the new residual. Rows of a 2-D x go through one
    fused kernel when `fused` (set by tidal.kernels.fused.use_fused_kernels)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim, dtype=dtype)
        self.fused: FusedOps | None = None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused is not None and x.dim() == 2:
            out, residual = self.fused.add_rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        out = F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return out if residual is None else (out, residual)


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (float32, CPU) and the cos/sin scale ("attention factor")."""
    dim = head_dim
    base = rope.theta
    p = rope.params
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = rope.rope_type
    if kind in ("default", "dynamic"):
        # Dynamic NTK only changes frequencies past max_position_embeddings, which the
        # cos/sin cache (and so the model) never reaches.
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / p["factor"], 1.0
    if kind == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(p, dim, base, max_position)
    raise ValueError(f"rope_type {kind!r} is not supported")


def _yarn_inv_freq(p: dict, dim: int, base: float, max_position: int) -> tuple[torch.Tensor, float]:
    orig_len = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position / orig_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attn_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: keep the original (extrapolated) frequency, 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, float(attn_factor)


@dataclass(slots=True)
class RopeInputs:
    """One forward's positions and the cos/sin table; the gathered cos/sin are built once, on
    first use (the fused q/k kernel reads the table directly)."""

    positions: torch.Tensor  # [T] int64
    table: torch.Tensor  # [max_position, head_dim] float32: cos | sin
    _gathered: tuple[torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, 1, head_dim/2] float32, broadcast over heads."""
        if self._gathered is None:
            cos, sin = self.table[self.positions].unsqueeze(1).chunk(2, dim=-1)
            self._gathered = (cos, sin)
        return self._gathered


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate halves) from a precomputed float32 cos/sin table, indexed by
    position on the device so the forward stays free of host syncs."""

    cos_sin: torch.Tensor  # a buffer: [max_position, head_dim] float32, cos | sin

    def __init__(self, rope: RopeConfig, head_dim: int, max_position: int):
        super().__init__()
        target = torch.get_default_device()
        with torch.device("cpu"):  # same table on every device, and real numbers even on "meta"
            inv_freq, attn_factor = rope_inv_freq(rope, head_dim, max_position)
            freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
            cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attn_factor
        self.register_buffer("cos_sin", cache.to(target), persistent=False)

    def forward(self, positions: torch.Tensor) -> RopeInputs:
        return RopeInputs(positions, self.cos_sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] (any strides); rotates the (x1, x2) halves in float32 (cos/sin are float32,
    so the products promote) and returns a contiguous tensor of x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out.chunk(2, dim=-1)
    o1.copy_(torch.addcmul(x1 * cos, x2, sin, value=-1))
    o2.copy_(torch.addcmul(x2 * cos, x1, sin))
    return out
