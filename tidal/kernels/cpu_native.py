"""The CPU kernels (cpu_kernels.c): built on first use with the machine's C compiler, loaded with
ctypes, called on torch tensors' memory.

- `decode_kernel()`: decode attention. Why C and not torch ops: decode on the CPU spent most of
  its attention time copying every sequence's context out of the paged cache for each layer (the
  gather that tidal.attention.cpu does before SDPA). The kernel reads the blocks in place
  through the block table instead.
- `row_kernels()`: a decoder layer's small ops (RoPE, SiLU * up; the RMSNorms stay in torch ops,
  see RowKernels.add_rms_norm), the CPU's counterpart of the Triton
  kernels of tidal.kernels.fused. In torch ops RoPE alone is ~8 calls per layer, each with its own
  dispatch and its own pass over memory: at decode batch sizes that overhead, not the
  arithmetic, is what they cost.

The source is plain C with no torch headers, so it builds in about a second with `cc -O3
-march=native` and needs nothing the machine does not already have; where no compiler works,
both are None and the torch ops run (said once in the log).

The library is cached under $TIDAL_CACHE_DIR (default ~/.cache/tidal) by a hash of the source,
the flags, the compiler and the CPU's feature flags, written to a temporary name and renamed, so
concurrent first uses (test workers, replicas) never load a half-written file. ctypes drops the
GIL for the call, so several threads can run row ranges of one batch at once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -fopenmp-simd: the kernel's `omp simd` loops vectorize (no OpenMP runtime is linked).
FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fopenmp-simd")
FLAGS += ("-ffp-contract=fast", "-fno-math-errno")
BUILD_TIMEOUT_S = 120.0

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get("TIDAL_CACHE_DIR") or Path.home() / ".cache" / "tidal") / "kernels"


def _build(compiler: str) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), compiler.encode(), _cpu_flags().encode()]))
    out = _cache_dir() / f"cpu_kernels-{platform.machine()}-{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


class DecodeKernel:
    """cpu_kernels.c's decode attention on torch tensors (float32, CPU, contiguous)."""

    MIN_ROWS_PER_THREAD = 4  # below it, handing rows to another thread costs more than it saves
    # ... and cached tokens read per thread (all rows together): a step of short contexts (64 rows of
    # ~100 tokens) ran slower split over two threads than on one
    MIN_KEYS_PER_THREAD = 4096

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fn = lib.tidal_paged_decode_f32
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_float]
        max_group, max_dim = i64(), i64()
        lib.tidal_paged_decode_limits(ctypes.byref(max_group), ctypes.byref(max_dim))
        self.max_group, self.max_dim = max_group.value, max_dim.value
        self._pool: ThreadPoolExecutor | None = None

    def supports(self, q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """q [B, Hq, D], kv_cache [2, blocks, block_size, Hkv, D] of one layer."""
        heads, kv_heads, dim = q.shape[1], kv_cache.shape[3], q.shape[2]
        return (
            q.dtype == kv_cache.dtype == torch.float32
            and q.device.type == kv_cache.device.type == "cpu"
            and kv_cache.is_contiguous()
            and heads % kv_heads == 0
            and heads // kv_heads <= self.max_group
            and dim <= self.max_dim
        )

    def __call__(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        max_threads: int | None = None,
    ) -> torch.Tensor:
        """Attention of each row's one query q[b] [Hq, D] over its first seq_lens[b] cached tokens,
        on up to `max_threads` threads (default: torch's intra-op thread count)."""
        q = q.contiguous()
        tables = block_tables.to(torch.int32).contiguous()
        lens = seq_lens.to(torch.int32).contiguous()
        out = torch.empty_like(q)
        rows, heads, dim = q.shape
        args = (
            q.data_ptr(),
            kv_cache[0].data_ptr(),
            kv_cache[1].data_ptr(),
            tables.data_ptr(),
            tables.stride(0),
            lens.data_ptr(),
            out.data_ptr(),
        )
        shape = (heads, kv_cache.shape[3], dim, kv_cache.shape[2], float(scale))

        def run(begin: int, end: int) -> None:
            if self._fn(*args, begin, end, *shape) != 0:
                raise RuntimeError(f"tidal_paged_decode_f32 failed on rows {begin}:{end} (heads {heads}, dim {dim})")

        threads = min(
            max_threads or torch.get_num_threads(),
            rows // self.MIN_ROWS_PER_THREAD,
            int(lens.sum()) // self.MIN_KEYS_PER_THREAD,
        )
        if threads <= 1:
            run(0, rows)
            return out
        if self._pool is None or self._pool._max_workers < threads - 1:
            self._pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="tidal-attn")
        bounds = [rows * i // threads for i in range(threads + 1)]
        futures = [self._pool.submit(run, bounds[i], bounds[i + 1]) for i in range(1, threads)]
        run(bounds[0], bounds[1])
        for f in futures:
            f.result()
        return out


def library() -> ctypes.CDLL | None:
    """The built library, or None where it cannot be built here (no C compiler, build failed;
    TIDAL_CPU_NATIVE=0 turns it off)."""
    global _library, _tried
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        _tried = True
        if os.environ.get("TIDAL_CPU_NATIVE", "1") == "0":
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            log.warning("no C compiler found: the CPU path runs torch ops instead of tidal's C kernels")
            return None
        try:
            _library = ctypes.CDLL(str(_build(compiler)))
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or e
            log.warning("building %s failed (%s): the CPU path runs torch ops instead", SOURCE.name, detail)
        return _library


@functools.cache
def decode_kernel() -> DecodeKernel | None:
    """Decode attention (DecodeKernel), or None where the library is not built."""
    lib = library()
    return None if lib is None else DecodeKernel(lib)


@functools.cache
def row_kernels() -> RowKernels | None:
    """The layer's small ops (RowKernels), or None where the library is not built."""
    lib = library()
    return None if lib is None else RowKernels(lib)


class RowKernels:
    """cpu_kernels.c's row kernels on float32 CPU tensors, with tidal.kernels.fused's signatures
    (the layers call either through their `fused` attribute). Rows must have a unit last stride."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._rope = lib.tidal_rope_f32
        self._rope.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64]
        self._silu = lib.tidal_silu_mul_f32
        self._silu.argtypes = [ptr, i64, ptr, i64, i64]
        for fn in (self._rope, self._silu):
            fn.restype = ctypes.c_int

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """torch's own ops, not C: which of two near-tied tokens greedy decoding picks can turn on
        the last bit of a norm, and torch's float reduction for the mean of squares is the one
        vLLM's CPU build agrees with (a C kernel summing in another order flipped 2 of 64 prompts
        of benchmarks/vs_vllm_cpu.py's medium workload against both)."""
        if residual is not None:
            x = x + residual
            residual = x
        return F.rms_norm(x, (x.shape[-1],), weight, eps), residual

    def qk_norm_rope(
        self,
        qkv: torch.Tensor,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        q_weight: torch.Tensor | None,
        k_weight: torch.Tensor | None,
        eps: float,
    ) -> torch.Tensor:
        """Qwen3's per-head q/k RMSNorm in torch ops (as add_rms_norm, for its bits), then RoPE in C."""
        qkv = _rows(qkv)
        tokens, heads = qkv.shape[0], num_q_heads + num_kv_heads
        if (q_weight is None) != (k_weight is None):
            raise ValueError("q_weight and k_weight: give both (Qwen3 q/k norm) or neither")
        if q_weight is not None and k_weight is not None:
            qk = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
            qn = F.rms_norm(qk[:, :num_q_heads], (head_dim,), q_weight, eps)
            kn = F.rms_norm(qk[:, num_q_heads:], (head_dim,), k_weight, eps)
            qkv = torch.cat([qn, kn], dim=1).view(tokens, heads * head_dim)
        out = torch.empty((tokens, heads, head_dim), dtype=qkv.dtype)
        pos = positions.to(torch.int64).contiguous()
        table = cos_sin.contiguous()
        if table.dtype != torch.float32 or table.shape[-1] != head_dim:
            raise ValueError(f"cos_sin: {tuple(table.shape)} {table.dtype}, expected [max_pos, {head_dim}] float32")
        if (
            self._rope(
                qkv.data_ptr(), qkv.stride(0), pos.data_ptr(), table.data_ptr(), out.data_ptr(), tokens, heads, head_dim
            )
            != 0
        ):
            raise ValueError(f"head_dim={head_dim}: expected an even head_dim")
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate_up = _rows(gate_up)
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty((rows, inter), dtype=gate_up.dtype)
        self._silu(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), rows, inter)
        return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"{tuple(x.shape)} {x.dtype} on {x.device}: expected a 2-D float32 CPU tensor")
    return x if x.stride(1) == 1 else x.contiguous()
