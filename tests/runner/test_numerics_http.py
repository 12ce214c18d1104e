"""The numerics options over HTTP: the CLI flags and the per-request `logprobs_mode` field."""
from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import Server


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    s = Server(tiny_ckpt("llama"), "--logprobs-mode", "processed", "--lm-head-dtype", "float32",
               "--batch-invariant", "--device", "cpu")
    yield s
    assert s.stop() == 0


def _generate(server, **sampling) -> dict:
    body = {"input_ids": [72, 101, 108], "sampling_params": {"max_tokens": 4, "temperature": 1.0, "top_k": 1,
                                                             "seed": 3, "ignore_eos": True, **sampling}}
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_engine_default_and_per_request_modes(server):
    # top_k=1: the sampling distribution has one token, of probability 1.
    assert _generate(server)["output_logprobs"] == [0.0] * 4
    assert all(lp < 0 for lp in _generate(server, logprobs_mode="raw")["output_logprobs"])
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hel", "max_tokens": 3, "top_k": 1, "logprobs": 1,
                                                         "logprobs_mode": "processed"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"]["token_logprobs"] == [0.0] * 3


def test_bad_mode_is_rejected_naming_the_field(server):
    r = httpx.post(server.url + "/generate", json={"input_ids": [1], "sampling_params": {"logprobs_mode": "x"}},
                   timeout=30)
    assert r.status_code in (400, 422) and "logprobs_mode" in r.text
