"""Engine configuration: one validated dataclass shared by LLM, AsyncLLM, the server and the CLI.

Each field that the command line sets carries its help text (and choices) in its metadata:
`tidal serve` and `tidal generate` build their engine options from these fields, so a new
field is a new flag with the same default, and the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")
ATTENTION_BACKENDS = ("auto", "cpu", "cuda", "invariant", "torch")


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A field with a CLI flag: `help`, optional `choices`, `negation` (an extra --no-... alias
    for a True-by-default bool), `group` ("engine" unless given)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # HF-format directory; None: the embedded tiny default (positional)
    dtype: str = _opt(
        "auto", "weight and activation dtype; auto: bfloat16 on GPU, float32 on CPU", choices=("auto", *DTYPES)
    )
    device: str = _opt("auto", "'cpu', 'cuda' or 'cuda:N'; auto: cuda if available")
    block_size: int = _opt(16, "KV cache block size in tokens (a power of two)")
    max_num_seqs: int = _opt(64, "most sequences in one batch")
    max_num_batched_tokens: int = _opt(2048, "token budget of one engine step")
    max_model_len: int | None = _opt(
        None, "longest prompt + output in tokens (default: the model's context length; larger is an error)"
    )
    enable_prefix_caching: bool = _opt(True, "reuse the KV of shared prompt prefixes", negation="--no-prefix-caching")
    load_format: str = _opt(
        "auto", "'dummy': random weights from config.json, for benchmarks", choices=("auto", "safetensors", "dummy")
    )
    seed: int = _opt(0, "engine seed for requests without one")
    num_kv_blocks: int | None = _opt(None, "KV cache size in blocks (default: from memory)")
    kv_cache_memory_gb: float = _opt(0.25, "KV cache size on CPU when --num-kv-blocks is not given")
    gpu_memory_utilization: float = _opt(0.85, "fraction of GPU memory the engine may use")
    attention_backend: str = _opt(
        "auto",
        "attention implementation; auto: cuda on GPU, cpu on CPU, invariant with --batch-invariant",
        choices=ATTENTION_BACKENDS,
    )
    enforce_eager: bool = _opt(False, "no CUDA graphs")
    fused_kernels: str = _opt(
        "auto",
        "the decoder layers' fused Triton kernels (tidal/kernels/fused.py); auto: on "
        "CUDA, on: also on CPU through Triton's interpreter (tests), off: torch ops",
        choices=("auto", "on", "off"),
    )
    overlap_scheduling: bool = _opt(True, "schedule step N+1 while step N runs")
    cpu_prepack_weights: bool = _opt(
        True,
        "CPU, float32: the linear layers run through oneDNN on weights reordered once into its blocked "
        "layout (a second copy of the weights in memory; off from the first weight update on)",
    )
    kv_refresh: bool = _opt(
        False,
        "CPU: before a weight update commits, recompute the running requests' KV under the staged "
        "weights in passes between steps: a push with no pause slows generation for longer instead "
        "of stopping it for one prefill of every running request (shorter longest gap, fewer tokens "
        "per second meanwhile, a longer push; tidal/engine/kv_refresh.py)",
    )
    reject_while_paused: bool = _opt(
        False, "answer new requests with 503 while the engine is paused (default: queue them)", group="server"
    )
    # update_weights paths (and wake-up reloads) must resolve inside it, every shard included;
    # the server passes its --weights-root here. None: any path the engine process can read.
    weights_root: str | None = None
    # Numerics for RL (docs/numerics.md).
    logprobs_mode: str = _opt(
        "raw", "logprobs of requests without their own logprobs_mode (docs/numerics.md)", choices=("raw", "processed")
    )
    lm_head_dtype: str | None = _opt(
        None, "run the LM head and log-softmax in float32 (default: the model dtype)", choices=("float32",)
    )
    batch_invariant: bool = _opt(
        False, "outputs bitwise identical whatever else is in the batch (CPU and CUDA; docs/numerics.md)"
    )

    def __post_init__(self) -> None:
        import torch

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"one of {sorted(DTYPES)}")
        _check(self.device == "cpu" or self.device.startswith("cuda"), "device", self.device, "'cpu' or 'cuda[:N]'")
        if self.device.startswith("cuda"):
            _check(torch.cuda.is_available(), "device", self.device, "a visible CUDA device (none found)")
        if self.attention_backend == "auto":
            if self.batch_invariant:
                self.attention_backend = "invariant"
            else:
                self.attention_backend = "cuda" if self.device.startswith("cuda") else "cpu"
        _check(
            not self.batch_invariant or self.attention_backend == "invariant",
            "attention_backend",
            self.attention_backend,
            "'auto' or 'invariant' when batch_invariant=True (the only backend whose rows do not depend on the batch)",
        )
        _check(
            self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
            "block_size",
            self.block_size,
            "a power of two",
        )
        _check(
            self.attention_backend in ATTENTION_BACKENDS,
            "attention_backend",
            self.attention_backend,
            f"one of {list(ATTENTION_BACKENDS)}",
        )
        _check(
            self.max_model_len is None or (isinstance(self.max_model_len, int) and self.max_model_len >= 2),
            "max_model_len",
            self.max_model_len,
            "None (the model's context length) or an integer >= 2 (one prompt token and one output token)",
        )
        _check(
            self.fused_kernels in ("auto", "on", "off"), "fused_kernels", self.fused_kernels, "'auto', 'on' or 'off'"
        )
        _check(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "an integer >= 1")
        _check(
            self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens, "an integer >= 1"
        )
        _check(
            self.load_format in ("auto", "dummy", "safetensors"),
            "load_format",
            self.load_format,
            "'auto', 'safetensors' or 'dummy'",
        )
        _check(
            self.num_kv_blocks is None or self.num_kv_blocks >= 2,
            "num_kv_blocks",
            self.num_kv_blocks,
            "None or an integer >= 2",
        )
        _check(
            self.weights_root is None or (isinstance(self.weights_root, str) and self.weights_root != ""),
            "weights_root",
            self.weights_root,
            "None or a directory path",
        )
        _check(
            0.0 < self.gpu_memory_utilization <= 1.0,
            "gpu_memory_utilization",
            self.gpu_memory_utilization,
            "a float in (0, 1]",
        )
        _check(self.logprobs_mode in ("raw", "processed"), "logprobs_mode", self.logprobs_mode, "'raw' or 'processed'")
        _check(
            self.lm_head_dtype in (None, "float32"),
            "lm_head_dtype",
            self.lm_head_dtype,
            "None (the model dtype) or 'float32'",
        )
        _check(isinstance(self.batch_invariant, bool), "batch_invariant", self.batch_invariant, "a bool")
        # On CUDA the mode needs the fused Triton norms/RoPE (one program per row); torch's CUDA
        # reductions pick their split by the number of rows.
        _check(
            not self.batch_invariant or self.device == "cpu" or self.fused_kernels != "off",
            "fused_kernels",
            self.fused_kernels,
            "'auto' or 'on' when batch_invariant=True on CUDA (the fused kernels are the "
            "row-invariant norms and RoPE there)",
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch as t

        return {
            "float32": t.float32,
            "float16": t.float16,
            "bfloat16": t.bfloat16,
            "fp32": t.float32,
            "fp16": t.float16,
            "bf16": t.bfloat16,
        }[self.dtype]


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"EngineConfig.{name}={value!r} is invalid: expected {expected}")
