"""Small helpers shared by the Triton attention kernels."""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache.shape={tuple(kv_cache.shape)}: expected [2, num_blocks, block_size, num_kv_heads, head_dim]"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")


def dot_precision(q: torch.Tensor) -> str:
    """tl.dot's input precision: float32 inputs multiply in full precision ("ieee"), not TF32,
    which Triton uses by default and which put a float32 model's logprobs 4e-4 off HF's; 16-bit
    inputs are exact either way."""
    return "ieee" if q.dtype == torch.float32 else "tf32"
