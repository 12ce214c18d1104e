from __future__ import annotations


import pytest

from tidal.cluster import GpuScheduler


@pytest.fixture
async def make_sched():
    made: list[GpuScheduler] = []

    async def make(num_gpus: int, **kw) -> GpuScheduler:
        kw.setdefault("default_timeout_s", 10.0)
        kw.setdefault("controller_timeout_s", 5.0)
        s = GpuScheduler(num_gpus, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()
        assert s._broken is None, s._broken
        s.state.check()
