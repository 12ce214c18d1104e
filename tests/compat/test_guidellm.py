"""guidellm (its CLI, unmodified, from its own venv: it pins click~=8.4 and its own torch) runs a
short bounded benchmark against `tidal serve`: 4 synchronous streamed chat requests of 8 tokens."""
from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from tests.compat.conftest import GUIDELLM

pytestmark = [pytest.mark.thirdparty, pytest.mark.timeout(600)]


def test_guidellm_short_run(compat_server, compat_model, tmp_path):
    if not GUIDELLM or not os.path.exists(GUIDELLM):
        pytest.skip("guidellm is not installed: pip install guidellm==0.8.1 in its own venv, set TIDAL_GUIDELLM")
    name = httpx.get(compat_server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    report = tmp_path / "guidellm.json"
    cmd = [GUIDELLM, "run", "--backend", f"kind=openai_http,target={compat_server.url},model={name}",
           "--tokenizer", f"kind=hf_auto,model={compat_model}", "--profile", "kind=synchronous",
           "--constraint", "kind=max_requests,count=4",
           "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
           "--output", f"kind=json,path={report}", "--disable-console-interactive"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [bench] = json.loads(report.read_text())["benchmarks"]
    assert bench["scheduler_metrics"]["requests_made"] == {"successful": 4, "errored": 0, "incomplete": 0, "total": 4}
    assert [r["output_tokens"] for r in bench["requests"]["successful"]] == [8] * 4
