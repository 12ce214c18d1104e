"""Every kernel of Tidal, the lowest layer (it imports nothing else from tidal). Triton:

- paged_decode, paged_prefill, kv_store: the CUDA attention backend's paged attention and KV store;
  paged_kv: the tile load their key loops share; utils: the helpers they share;
- invariant_attention, matmul, rowwise: the batch-invariant mode's attention, linear and vocab
  reductions (docs/numerics.md);
- fused: the decoder layers' add+RMSNorm, q/k RMSNorm+RoPE and SiLU*up;
- sampling: the sampler's race (noise + argmax) in one pass.

Each also runs on the CPU in Triton's interpreter (TRITON_INTERPRET=1), where the tests check it
against torch.

C, for the CPU: cpu_native builds cpu_kernels.c (decode attention reading the block table in
place, and the row kernels a layer's small ops run on) with the machine's compiler and loads it
with ctypes; the CPU attention backend and the layers' fused path use it.
"""

from __future__ import annotations

from tidal.kernels.utils import interpreting

__all__ = ["interpreting"]
