"""Shared setup for the attention kernel tests (TRITON_INTERPRET is set in tests/conftest.py)."""
from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_interpret: Triton kernel test; on CPU it runs in the interpreter")
