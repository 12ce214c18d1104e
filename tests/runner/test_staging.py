"""The runner's pinned staging buffers: packed uploads whose arrays all start 16-byte aligned."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tidal.runner.runner import _Staging
from tidal.runner.sampler import SamplingTensors
from tidal.sampling_params import SamplingParams


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32])
@pytest.mark.parametrize("sizes", [(1, 3, 5), (2, 7, 1, 4), (16, 9)])
def test_upload_round_trips_and_aligns_every_array(dtype, sizes):
    # Triton compiles a kernel variant per pointer alignment: odd offsets would recompile
    # kernels whenever a batch's sizes changed.
    staging = _Staging(torch.device("cpu"))
    arrays = [np.arange(n * 3, dtype=np.int64).reshape(n, 3) + 100 * i for i, n in enumerate(sizes)]
    out = staging.upload("k", arrays, dtype)
    for a, t in zip(arrays, out):
        assert t.dtype == dtype and tuple(t.shape) == a.shape
        assert t.data_ptr() % 16 == 0
        assert torch.equal(t, torch.from_numpy(a).to(dtype))


@pytest.mark.parametrize("n", [1, 3, 6])
def test_sampling_tensors_rows_are_aligned(n):
    staging = _Staging(torch.device("cpu"))
    params = [SamplingParams(temperature=0.5 + i, top_k=i) for i in range(n)]
    t = SamplingTensors.from_rows([SamplingTensors.row(p, 10 + i) for i, p in enumerate(params)],
                                  list(range(n)), staging)
    for field in (t.temperature, t.top_p, t.min_p, t.top_k, t.seeds, t.steps):
        assert field.shape == (n,) and field.data_ptr() % 16 == 0
    assert t.seeds.tolist() == [10 + i for i in range(n)] and t.steps.tolist() == list(range(n))
    assert t.temperature.tolist() == [0.5 + i for i in range(n)]
