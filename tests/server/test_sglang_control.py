"""SGLang's control and info routes against a real `tidal serve`, reply shapes field by field:
abort_request, pause_generation / continue_generation, flush_cache, release / resume memory,
update_weights_from_disk and _from_tensor (safetensors only, never pickle) with string weight
labels, get_server_info, get_model_info, get_weight_version, health_generate, /v1/loads."""
from __future__ import annotations

import asyncio
import base64
import glob
import os
import time

import httpx
import pytest
from safetensors.torch import load_file, save

IDS = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def sgl(make_server, tiny_ckpt):
    s = make_server(tiny_ckpt("llama", seed=5), "--max-num-seqs", "8")
    yield s
    s.stop()


def op(s, path: str, body: dict | None = None, status: int = 200, method: str = "POST") -> dict:
    r = httpx.request(method, s.url + path, json=body, headers=s.admin_headers(), timeout=120)
    assert r.status_code == status, (path, r.text)
    return r.json()


def gen(s, **sp) -> dict:
    r = httpx.post(s.url + "/generate", json={"input_ids": IDS, "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, **sp}}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_info_routes(sgl):
    info = op(sgl, "/get_model_info", method="GET")
    assert info["is_generation"] is True and info["weight_version"] == "0"
    assert os.path.isdir(info["model_path"]) and info["tokenizer_path"] == info["model_path"]
    server = op(sgl, "/get_server_info", method="GET")
    assert server["context_length"] == 512 and server["tp_size"] == 1 and server["model_path"] == info["model_path"]
    assert server["weight_version"] == op(sgl, "/get_weight_version", method="GET")["weight_version"]
    loads = op(sgl, "/v1/loads", method="GET")
    assert loads["dp_rank_count"] == 1 and set(loads["loads"][0]) >= {"dp_rank", "num_running_reqs",
                                                                      "num_waiting_reqs", "token_usage"}
    assert op(sgl, "/health_generate", method="GET") == {"status": "ok"}


def test_flush_cache_get_and_post(sgl):
    assert op(sgl, "/flush_cache")["success"] is True
    assert op(sgl, "/flush_cache", method="GET")["success"] is True


def test_abort_request_by_rid_and_bad_bodies(sgl):
    async def run() -> tuple[dict, dict]:
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"input_ids": IDS, "rid": "to-abort",
                    "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}
            work = asyncio.ensure_future(c.post(sgl.url + "/generate", json=body))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:    # until it runs
                st = (await c.get(sgl.url + "/v1/state", headers=sgl.admin_headers())).json()
                if st["num_running"] and st["step_count"]:
                    break
                await asyncio.sleep(0.01)
            r = await c.post(sgl.url + "/abort_request", json={"rid": "to-abort"}, headers=sgl.admin_headers())
            return r.json(), (await work).json()
    reply, out = asyncio.run(run())
    assert reply["success"] is True and reply["aborted"] == ["to-abort"]
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and len(out["output_ids"]) < 400
    for body in ({}, {"rid": "x", "abort_all": True}):
        assert op(sgl, "/abort_request", body, 400)["error"]["param"] == "rid"
    assert op(sgl, "/abort_request", {"rid": "x", "extra": 1}, 400)["error"]["param"] == "extra"


def test_pause_modes_and_continue(sgl):
    for mode, engine_mode in (("in_place", "keep"), ("retract", "retract"), ("abort", "abort")):
        reply = op(sgl, "/pause_generation", {"mode": mode})
        assert reply["success"] is True and reply["mode"] == engine_mode
        assert sgl.control("/v1/is_paused", method="GET")["is_paused"] is True
        assert op(sgl, "/continue_generation")["success"] is True
        assert sgl.control("/v1/is_paused", method="GET")["is_paused"] is False
    assert op(sgl, "/pause_generation", {"mode": "drain"}, 400)["error"]["param"] == "mode"


def test_release_and_resume_memory(sgl):
    before = gen(sgl)["output_ids"]
    r = op(sgl, "/release_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]})
    assert r["success"] is True and sgl.control("/v1/state", method="GET")["sleeping"] == ["kv_cache"]
    assert op(sgl, "/resume_memory_occupation", {"tags": ["kv_cache"]})["success"] is True
    op(sgl, "/release_memory_occupation", {})
    assert sgl.control("/v1/state", method="GET")["sleeping"] == ["kv_cache", "weights"]
    op(sgl, "/resume_memory_occupation")
    state = sgl.control("/v1/state", method="GET")
    assert state["sleeping"] == [] and state["state"] == "serving"     # released while serving: serving again
    assert gen(sgl)["output_ids"] == before
    assert op(sgl, "/release_memory_occupation", {"tags": ["gpu"]}, 400)["error"]["param"].startswith("tags")


def test_update_from_disk_with_string_and_integer_labels(sgl, tiny_ckpt):
    other = tiny_ckpt("llama", seed=6)
    v0 = sgl.control("/v1/state", method="GET")["weight_version"]
    r = op(sgl, "/update_weights_from_disk", {"model_path": other, "weight_version": "step-1"})
    assert r["success"] is True and r["weight_version"] == "step-1"
    assert op(sgl, "/get_weight_version", method="GET") == {"weight_version": "step-1"}
    out = gen(sgl)
    assert out["meta_info"]["weight_version"] == "step-1" and out["weight_version"] == v0 + 1
    r = op(sgl, "/update_weights_from_disk", {"model_path": other, "weight_version": 9, "abort_all_requests": True})
    assert r["weight_version"] == "9" and gen(sgl)["weight_version"] == 9
    r = op(sgl, "/update_weights_from_disk", {"model_path": other, "weight_version": "9", "allow_interrupt": True})
    assert r["skipped"] is True and r["weight_version"] == "9"
    assert op(sgl, "/update_weights_from_disk", {"model_path": other, "flush_cache": False}, 400)["error"]["param"] \
        == "flush_cache"
    assert op(sgl, "/update_weights_from_disk", {"model_path": "/nonexistent"}, 400)["error"]["param"] == "path"


def test_update_from_tensor_reads_safetensors_never_pickle(sgl, tiny_ckpt):
    target = tiny_ckpt("llama", seed=7)
    tensors = {}
    for f in glob.glob(os.path.join(target, "*.safetensors")):
        tensors.update(load_file(f))
    blob = base64.b64encode(save(tensors)).decode()
    for fmt in (None, "direct", "flattened_bucket"):
        err = op(sgl, "/update_weights_from_tensor", {"serialized_named_tensors": [blob], "load_format": fmt}, 400)
        assert err["error"]["param"] == "load_format" and "pickle" in err["error"]["message"]
    r = op(sgl, "/update_weights_from_tensor", {"serialized_named_tensors": [blob], "load_format": "safetensors",
                                                 "weight_version": "from-tensor"})
    assert r["success"] is True and r["weight_version"] == "from-tensor", r
    op(sgl, "/update_weights_from_disk", {"model_path": target, "weight_version": "from-disk"})
    from_disk = gen(sgl)["output_ids"]
    op(sgl, "/update_weights_from_tensor", {"serialized_named_tensors": [blob], "load_format": "safetensors"})
    assert gen(sgl)["output_ids"] == from_disk                     # the same weights either way
    bad = op(sgl, "/update_weights_from_tensor", {"serialized_named_tensors": ["not base64!"],
                                                   "load_format": "safetensors"}, 400)
    assert bad["error"]["param"] == "serialized_named_tensors"
