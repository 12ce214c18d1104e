"""Triton kernels that do not belong to one model or attention backend (the lowest layer: they
import nothing from tidal). Each also runs on the CPU in Triton's interpreter (TRITON_INTERPRET=1),
where the tests check it against torch."""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
