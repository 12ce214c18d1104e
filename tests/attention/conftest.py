"""Shared setup for the attention kernel tests.

Without a GPU the Triton kernels run on the CPU through Triton's interpreter; the variable must
be set before any kernel module is imported (triton.jit reads it at decoration time).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_interpret: Triton kernel test; on CPU it runs in the interpreter")
