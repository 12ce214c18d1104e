from __future__ import annotations

import pytest

from tidal import LLM


def assert_no_leaks(llm: LLM) -> None:
    """Every block is free or cached, and the bookkeeping invariants hold (engine idle)."""
    core = llm.engine.core
    st = llm.state()
    assert st["num_running"] == 0 and st["num_waiting"] == 0, st
    assert st["kv_blocks_used"] == 0, st
    core.block_manager.check_invariants([])


@pytest.fixture
def make_llm():
    made: list[LLM] = []

    def make(path: str, **kw) -> LLM:
        kw.setdefault("dtype", "float32")
        kw.setdefault("device", "cpu")
        kw.setdefault("block_size", 4)
        kw.setdefault("num_kv_blocks", 512)
        llm = LLM(path, **kw)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.shutdown()
