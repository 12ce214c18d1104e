"""The CPU commit that swaps parameter storage instead of copying into it (DESIGN.md §8).

A copy commit writes every staged byte into the live parameters on the core thread, casting on
the way (a bf16 trainer into a float32 engine: 1 GB read, 2 GB written for a 0.5B model), and no
step runs meanwhile. On the CPU nothing holds a parameter's address, so the weights worker casts
each staged tensor into a buffer shaped like its live parameter instead, and the commit only
points each nn.Parameter the model holds at its buffer (`param.data = buffer`): no bytes move on
the core thread. The storage a commit replaces becomes the next update's buffer (ping-pong), so
after the first update nothing is allocated (a fresh CPU buffer costs a page fault per page).

A parameter the update covers only in part (one slice of a fused qkv or gate_up, or a subset
update) gets its other rows copied from the live values before the swap: the live values cannot
change meanwhile, since one weight operation runs at a time. Tied names (lm_head and
embed_tokens) are one parameter object, so a swap keeps them tied; later names win, as with a copy.

The copy commit stays where a swap would be wrong: on CUDA (captured graphs hold the parameters'
addresses), for in-place staging (already written), and for any parameter that does not own its
storage outright (a view, or storage another parameter shares): `swappable` says which.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tidal.engine.messages import EngineError


def swappable(model: nn.Module) -> set[nn.Parameter]:
    """The parameters whose storage is theirs alone: contiguous, the whole storage, on the CPU,
    and no other parameter object over the same storage."""
    by_storage: dict[int, list[nn.Parameter]] = {}
    for p in model.parameters():  # a tied parameter appears once: it is one object
        by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(p)
    out = set()
    for params in by_storage.values():
        p = params[0]
        whole = p.storage_offset() == 0 and p.untyped_storage().nbytes() == p.numel() * p.element_size()
        if len(params) == 1 and p.device.type == "cpu" and p.is_contiguous() and whole and p.numel() > 0:
            out.add(p)
    return out


class SwapStage:
    """Worker thread: put() each staged tensor into its parameter's buffer, then finish(). Core
    thread: swap() at the commit, or give_back() when the update is dropped. `spare` maps a
    parameter to storage a previous swap replaced (the arena of this update)."""

    def __init__(self, model: nn.Module, spare: dict[nn.Parameter, torch.Tensor]) -> None:
        self.model, self.spare = model, spare
        # a registered model class without weight_slot keeps the copy commit
        self.slot_of = getattr(model, "weight_slot", None)
        self.ok = swappable(model) if self.slot_of is not None else set()
        self.buffers: dict[nn.Parameter, torch.Tensor] = {}
        self.rows: dict[nn.Parameter, list[tuple[int, int]]] = {}  # rows written, per parameter
        self.names: set[str] = set()
        self.bytes = 0

    def put(self, name: str, tensor: torch.Tensor) -> bool:
        """Cast `tensor` into its rows of the buffer; False if its parameter must be copied at
        the commit instead (see `swappable`). Call model.check_weight first."""
        if self.slot_of is None:
            return False
        slot = self.slot_of(name)
        if slot is None:  # a buffer the model ignores
            return True
        param, start, rows = slot
        if param not in self.ok:
            return False
        buf = self.buffers.get(param)
        if buf is None:
            buf = self.spare.pop(param, None)
            if buf is None or buf.shape != param.shape or buf.dtype != param.dtype:
                buf = torch.empty_like(param, memory_format=torch.contiguous_format)
            self.buffers[param] = buf
        with torch.no_grad():
            buf.narrow(0, start, rows).copy_(tensor)
        self.rows.setdefault(param, []).append((start, start + rows))
        self.names.add(name)
        self.bytes += tensor.numel() * tensor.element_size()
        return True

    def finish(self) -> None:
        """Copy the live values into every row the update left out."""
        with torch.no_grad():
            for param, buf in self.buffers.items():
                live = param.detach()
                if live.shape != buf.shape:  # the weights were put to sleep meanwhile
                    raise EngineError("update_weights: the weights went to sleep while the update was staged")
                for a, b in _gaps(self.rows[param], buf.shape[0]):
                    buf[a:b].copy_(live[a:b])

    def swap(self) -> None:
        """Point every parameter at its buffer; the storage it replaces is the next update's."""
        with torch.no_grad():
            for param, buf in self.buffers.items():
                old = param.data
                param.data = buf
                # Caches keyed by (data_ptr, _version) — Linear's fp32 copy — must see a change
                # even when the ping-pong brings back an address they saw before.
                torch.autograd.graph.increment_version(param)
                self.spare[param] = old
        self.buffers = {}

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The staged values in the parameters for the duration, the live ones again after,
        whatever happens: a forward pass under the new weights before the commit (kv_refresh.py).
        Derived copies keyed by (data_ptr, _version) see the other storage and are rebuilt."""
        live = {param: param.data for param in self.buffers}
        try:
            with torch.no_grad():
                for param, buf in self.buffers.items():
                    param.data = buf
            yield
        finally:
            with torch.no_grad():
                for param, old in live.items():
                    param.data = old

    def give_back(self) -> None:
        """The update was dropped: its buffers are the next one's arena."""
        for param, buf in self.buffers.items():
            self.spare.setdefault(param, buf)
        self.buffers = {}


def _gaps(covered: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The row ranges of [0, n) that no (start, end) in `covered` touches."""
    out, at = [], 0
    for a, b in sorted(covered):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < n:
        out.append((at, n))
    return out
