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
    assert not core.runner.sampling_rows, "the runner still caches rows of finished requests"


def _factory(cls, num_kv_blocks: int):
    """A fixture body: make(path, **engine_kwargs) builds `cls` with small CPU defaults and
    shuts every engine it made down at the end of the test."""
    made = []

    def make(path: str, **kw):
        kw.setdefault("dtype", "float32")
        kw.setdefault("device", "cpu")
        kw.setdefault("block_size", 4)
        kw.setdefault("num_kv_blocks", num_kv_blocks)
        engine = cls(path, **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown()


@pytest.fixture
def make_llm():
    yield from _factory(LLM, num_kv_blocks=512)


@pytest.fixture
def make_engine():
    from tidal import AsyncLLM
    yield from _factory(AsyncLLM, num_kv_blocks=2048)
