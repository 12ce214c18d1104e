"""The narrow interface between models and attention kernels.

A batch is flattened: the new tokens of every sequence are concatenated into T rows.
Sequence i owns query rows ``query_start_loc[i]:query_start_loc[i+1]``; those queries sit
at the last ``q_len_i`` positions of the sequence, whose full length (cached context plus
the new tokens) is ``seq_lens[i]``. A query at position p attends to keys 0..p (causal).

The KV cache of one layer is a tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0: keys, 1: values). Token slot s lives at ``block s // block_size``, offset
``s % block_size``. ``block_tables[i, j]`` is the j-th block of sequence i.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1: don't store)
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32: context + new tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host-side copies, for backends that loop or pick kernels on the CPU.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # CPU kernels that run their own threads (the C decode kernel) may use up to this many; 0: torch's
    # intra-op thread count at the call
    cpu_threads: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode(self) -> bool:
        """Every sequence has exactly one new token."""
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Stores the new K/V into the paged cache, then attends over the cached context."""

    name: str = "abstract"
    # True when a row's output depends only on its own sequence, bitwise, whatever else is in the
    # batch (the engine's batch-invariant mode picks such a backend).
    batch_invariant: bool = False

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D]; kv_cache: [2, NB, BS, Hkv, D]. Returns [T, Hq, D]."""


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str):
    def wrap(factory: Callable[[], AttentionBackend]):
        _BACKENDS[name] = factory
        return factory

    return wrap


def get_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        # Backends register on import; import the known modules lazily.
        import tidal.attention.cpu  # noqa: F401
        import tidal.attention.invariant  # noqa: F401
        import tidal.attention.torch_ref  # noqa: F401

        if name == "cuda":
            import tidal.attention.cuda  # noqa: F401
    if name not in _BACKENDS:
        raise ValueError(f"attention_backend={name!r} is unknown: expected one of {sorted(_BACKENDS)}")
    return _BACKENDS[name]()


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Reference KV store: write each token's K/V into its cache slot."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    kc = kv_cache[0].view(-1, num_kv_heads, head_dim)
    vc = kv_cache[1].view(-1, num_kv_heads, head_dim)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    kc.index_copy_(0, slot_mapping, k.to(kc.dtype))
    vc.index_copy_(0, slot_mapping, v.to(vc.dtype))
