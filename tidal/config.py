"""Engine configuration: one validated dataclass shared by LLM, AsyncLLM and the server."""
from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None               # HF-format directory; None: the embedded tiny default
    dtype: str = "auto"                     # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"                    # auto: cuda if available, else cpu
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None        # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    load_format: str = "auto"               # "auto" (safetensors) | "dummy" (random from config)
    seed: int = 0
    num_kv_blocks: int | None = None        # default: sized from kv_cache_memory_gb / GPU memory
    kv_cache_memory_gb: float = 0.25        # CPU KV pool size when num_kv_blocks is None
    gpu_memory_utilization: float = 0.85
    attention_backend: str = "auto"         # auto: cuda on GPU, cpu (batched torch) on CPU
    enforce_eager: bool = False             # disable CUDA graphs
    overlap_scheduling: bool = True         # schedule step N+1 while step N runs (EngineCore.step)
    reject_while_paused: bool = False       # new requests while not serving: queue (False) or reject
    # update_weights paths (and wake-up reloads) must resolve inside it, every shard included;
    # the server passes its --weights-root here. None: any path the engine process can read.
    weights_root: str | None = None
    # Numerics for RL (docs/numerics.md).
    logprobs_mode: str = "raw"              # default of requests without one: "raw" | "processed"
    lm_head_dtype: str | None = None        # None: the model dtype; "float32": LM head + log-softmax in fp32
    batch_invariant: bool = False           # outputs bitwise identical whatever else is in the batch

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        _check(self.dtype in _DTYPES, "dtype", self.dtype, f"one of {sorted(_DTYPES)}")
        _check(self.device == "cpu" or self.device.startswith("cuda"), "device", self.device, "'cpu' or 'cuda[:N]'")
        if self.device.startswith("cuda"):
            _check(torch.cuda.is_available(), "device", self.device, "a visible CUDA device (none found)")
        if self.attention_backend == "auto":
            if self.batch_invariant:
                self.attention_backend = "invariant"
            else:
                self.attention_backend = "cuda" if self.device.startswith("cuda") else "cpu"
        _check(not self.batch_invariant or self.attention_backend == "invariant", "attention_backend",
               self.attention_backend, "'auto' or 'invariant' when batch_invariant=True (the only backend whose "
               "rows do not depend on the batch)")
        _check(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
               "block_size", self.block_size, "a power of two")
        _check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "an integer >= 1")
        _check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
               self.max_num_batched_tokens, "an integer >= 1")
        _check(self.load_format in ("auto", "dummy", "safetensors"), "load_format", self.load_format,
               "'auto', 'safetensors' or 'dummy'")
        _check(self.num_kv_blocks is None or self.num_kv_blocks >= 2, "num_kv_blocks",
               self.num_kv_blocks, "None or an integer >= 2")
        _check(self.weights_root is None or (isinstance(self.weights_root, str) and self.weights_root != ""),
               "weights_root", self.weights_root, "None or a directory path")
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
               self.gpu_memory_utilization, "a float in (0, 1]")
        _check(self.logprobs_mode in ("raw", "processed"), "logprobs_mode", self.logprobs_mode,
               "'raw' or 'processed'")
        _check(self.lm_head_dtype in (None, "float32"), "lm_head_dtype", self.lm_head_dtype,
               "None (the model dtype) or 'float32'")
        _check(isinstance(self.batch_invariant, bool), "batch_invariant", self.batch_invariant, "a bool")
        # On CUDA the cuBLAS matmuls and the decode/prefill kernel choice still depend on the batch.
        _check(not self.batch_invariant or self.device == "cpu", "batch_invariant", self.batch_invariant,
               f"False on device {self.device!r} (batch-invariant mode runs on the CPU for now)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"EngineConfig.{name}={value!r} is invalid: expected {expected}")
