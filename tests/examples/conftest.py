"""Tests marked `slow` here run only when asked for: `pytest -m slow tests/examples`."""
from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow (minutes on 2 CPU cores): run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
