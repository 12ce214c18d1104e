"""TRL's `VLLMClient` (trl.generation.vllm_client, which imports vLLM) against `tidal serve`, run in
the vLLM CPU build's own venv as a subprocess: generate (text and token-id prompts, n, top
logprobs), get_sequence_logprobs (prompt logprobs), get_world_size, reset_prefix_cache. Weight sync
is not run: TRL's init_communicator needs a CUDA device (docs/compatibility.md)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.compat.conftest import VLLM_CPU_PYTHON

pytestmark = [pytest.mark.thirdparty, pytest.mark.timeout(600)]
SCRIPT = Path(__file__).with_name("trl_client_script.py")


def completion(server, prompt, **fields) -> dict:
    body = {"model": "m", "prompt": prompt, "temperature": 0, "return_token_ids": True, **fields}
    body["model"] = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def run_trl(server) -> dict:
    if not os.path.exists(VLLM_CPU_PYTHON):
        pytest.skip(f"no vLLM CPU venv at {VLLM_CPU_PYTHON} (set TIDAL_VLLM_CPU_PYTHON): TRL's VLLMClient imports vLLM")
    check = subprocess.run([VLLM_CPU_PYTHON, "-c", "import trl.generation.vllm_client"], capture_output=True,
                           timeout=300)
    if check.returncode != 0:
        pytest.skip(f"trl does not import in {VLLM_CPU_PYTHON}: pip install trl==1.16.0 there")
    proc = subprocess.run([VLLM_CPU_PYTHON, str(SCRIPT), server.url], capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-6000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def test_trl_vllm_client(compat_server):
    out = run_trl(compat_server)
    text = out["generate_text"]
    for prompt, ids, completion_ids, top in zip(["hello", "abc"], text["prompt_ids"], text["completion_ids"],
                                                text["logprob_token_ids"]):
        want = completion(compat_server, prompt, max_tokens=4)["choices"][0]
        assert ids == want["prompt_token_ids"] and completion_ids == want["token_ids"]
        # greedy: the sampled token is the most likely one, first of its sorted top-2 (+ sampled) entries
        assert [t[0] for t in top] == completion_ids and all(len(t) == 2 for t in top)
    gen = out["generate_ids"]
    assert gen["prompt_ids"] == [[104, 105], [97]] and len(gen["completion_ids"]) == 4
    assert gen["completion_ids"][0] == gen["completion_ids"][1] == completion(
        compat_server, [[104, 105]], max_tokens=3)["choices"][0]["token_ids"]
    seq = out["sequence_logprobs"]
    want = completion(compat_server, [[104, 101, 108, 108, 111]], max_tokens=1, prompt_logprobs=5)["choices"][0]
    for pos, actual in zip(range(2, 5), seq["actual_logprobs"][0]):
        entry = want["prompt_logprobs"][pos][str([104, 101, 108, 108, 111][pos])]
        assert actual[0] == pytest.approx(entry["logprob"], abs=1e-5)
    assert out["world_size"] == 1 and out["reset_prefix_cache"]
