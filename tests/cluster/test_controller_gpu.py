"""ReplicaController on a real GPU: a replica pinned to GPU 0 serves through its pipeline's router,
a shrink releases its memory and verifies the release against the device's own counter (NVML, or
nvidia-smi), and an expand wakes it to serve again. Run on the device with `pytest -m gpu`."""
from __future__ import annotations

import httpx
import pytest
import torch

from tidal.cluster import ClusterSpec
from tidal.cluster.controller import ControllerConfig, HostWeights, ReplicaController, RouterProcess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(600)]

# A KV cache of ~13 GB (100,000 blocks of 131 KB) and ~200 MB of bf16 weights, so the device-counter
# check measures a real release, far above the slack.
SERVE_ARGS = ("--num-kv-blocks", "100000", "--max-num-seqs", "16", "--log-level", "warning")
ARCH = dict(num_hidden_layers=8, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
            num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)


async def _complete(router_url: str) -> dict:
    async with httpx.AsyncClient(timeout=60) as c:
        model = (await c.get(f"{router_url}/v1/models")).json()["data"][0]["id"]
        r = await c.post(f"{router_url}/v1/completions",
                         json={"model": model, "prompt": [5, 9, 2, 7, 11], "max_tokens": 8, "temperature": 0})
        r.raise_for_status()
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("length", "stop")
        return choice


async def test_shrink_is_verified_on_the_device_counter_and_expand_serves_again(tmp_path, tiny_ckpt):
    router = await RouterProcess.start(str(tmp_path))
    cfg = ControllerConfig(model=tiny_ckpt(**ARCH), device="cuda", serve_args=SERVE_ARGS, log_dir=str(tmp_path),
                           start_timeout_s=240)
    ctrl = ReplicaController("P", ClusterSpec(gpus=(0,), generation=True), router.url, cfg, HostWeights())
    try:
        await ctrl.expand([0])
        first = await _complete(router.url)
        await ctrl.shrink([0])
        shrink = ctrl.records[-1]
        d = shrink.detail
        assert d["verified"] is True and d["counter"] == "device_used", d
        assert d["expected_drop_bytes"] > 12 << 30, d  # the KV cache and the weights, measured
        assert d["measured_drop_bytes"] >= 0.9 * d["expected_drop_bytes"] - (4 << 20), d
        assert ctrl.serving == set()
        await ctrl.expand([0])
        expand = ctrl.records[-1]
        assert "wake" in expand.phases and ctrl.serving == {0}, expand
        again = await _complete(router.url)
        assert again["text"] == first["text"]  # same weights, greedy: the same continuation
    finally:
        await ctrl.close()
        await router.stop()
