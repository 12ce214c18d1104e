"""The CPU decode-attention kernel (paged_decode_cpu.c): built on first use with the machine's C
compiler, loaded with ctypes, called on torch tensors' memory.

Why C and not torch ops: decode on the CPU spends most of its attention time copying every
sequence's context out of the paged cache for each layer (the gather that tidal.attention.cpu
does before SDPA). The kernel reads the blocks in place through the block table instead. It is
plain C with no torch headers, so it builds in well under a second with `cc -O3 -march=native`
and needs nothing the machine does not already have; where no compiler works, `decode_kernel()`
is None and the CPU backend keeps its tensor-op path (said once in the log).

The library is cached under $TIDAL_CACHE_DIR (default ~/.cache/tidal) by a hash of the source,
the flags, the compiler and the CPU's feature flags, written to a temporary name and renamed, so
concurrent first uses (test workers, replicas) never load a half-written file. ctypes drops the
GIL for the call, so several threads can run row ranges of one batch at once.
"""

from __future__ import annotations

import ctypes
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

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode_cpu.c")
# -fopenmp-simd: the kernel's `omp simd` loops vectorize (no OpenMP runtime is linked).
FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fopenmp-simd")
FLAGS += ("-ffp-contract=fast", "-fno-math-errno")
BUILD_TIMEOUT_S = 120.0

_lock = threading.Lock()
_kernel: DecodeKernel | None = None
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
    out = _cache_dir() / f"paged_decode_cpu-{platform.machine()}-{key.hexdigest()[:16]}.so"
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
    """paged_decode_cpu.c's entry point on torch tensors (float32, CPU, contiguous)."""

    MIN_ROWS_PER_THREAD = 4  # below it, handing rows to another thread costs more than it saves

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
        self, q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention of each row's one query q[b] [Hq, D] over its first seq_lens[b] cached tokens."""
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
                raise RuntimeError(f"paged_decode_cpu failed on rows {begin}:{end} (heads {heads}, dim {dim})")

        threads = min(torch.get_num_threads(), rows // self.MIN_ROWS_PER_THREAD)
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


def decode_kernel() -> DecodeKernel | None:
    """The built kernel, or None where it cannot be built here (no C compiler, build failed;
    TIDAL_CPU_NATIVE=0 turns it off)."""
    global _kernel, _tried
    if _tried:
        return _kernel
    with _lock:
        if _tried:
            return _kernel
        _tried = True
        if os.environ.get("TIDAL_CPU_NATIVE", "1") == "0":
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            log.warning("no C compiler found: CPU decode attention uses the tensor-op path")
            return None
        try:
            _kernel = DecodeKernel(ctypes.CDLL(str(_build(compiler))))
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            detail = getattr(e, "stderr", "") or e
            log.warning("building %s failed (%s): CPU decode attention uses the tensor-op path", SOURCE.name, detail)
        return _kernel
