"""Shared fixtures: tiny random checkpoints created once per session."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run on the CPU in Triton's interpreter. triton.jit reads the
# variable when a kernel is defined, so it is set here, before any test module imports tidal.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    # Tiny models: more threads only add dispatch overhead.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(arch="llama", **overrides) -> path of a tiny HF checkpoint (cached per session)."""
    from tidal.models.tiny import make_tiny_checkpoint

    cache: dict[tuple, str] = {}

    def make(arch: str = "llama", seed: int = 0, num_shards: int = 1, **overrides) -> str:
        key = (arch, seed, num_shards, repr(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = make_tiny_checkpoint(str(path), arch, seed=seed, num_shards=num_shards, **overrides)
        return cache[key]

    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` run only when asked for (`pytest -m slow ...`): minutes on 2 CPU cores,
    or real-process scenarios whose timing windows an idle CI machine can jump over."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
