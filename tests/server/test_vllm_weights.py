"""vLLM's weight-transfer routes (/init_weight_transfer_engine, /start_weight_update,
/update_weights, /finish_weight_update) against `tidal serve`, driven by a trainer process that
has nothing but torch.distributed and httpx: per-tensor broadcasts in `names` order, as vLLM's
NCCLWeightTransferUpdateInfo describes them (packed=false)."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.server.conftest import free_port
from tests.server.test_weight_sync import N_TOKENS, PROMPT, hf_greedy

# vLLM's flow from a trainer: init (the server joins while the trainer rendezvous), then
# start -> update_weights (the trainer broadcasts while the call is open) -> finish(version).
VLLM_TRAINER = r"""
import glob, json, os, sys, threading, torch, httpx
import torch.distributed as dist
from datetime import timedelta
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous
from safetensors.torch import load_file

args = json.loads(sys.argv[1])
url, port, name = args["url"], args["port"], "tidal-weights"

def in_thread(path, body):
    box = {}
    t = threading.Thread(target=lambda: box.update(r=httpx.post(url + path, json=body, timeout=120)))
    t.start()
    return t, box

t, init = in_thread("/init_weight_transfer_engine", {"init_info": {
    "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2}})
timeout = timedelta(seconds=30)
store, rank, world = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, 2, timeout=timeout))
store.set_timeout(timeout)
pg, _ = _new_process_group_helper(2, 0, [], Backend("gloo"), PrefixStore(name, store), group_name=name,
                                  timeout=timeout)
_world.pg_group_ranks[pg] = {0: 0, 1: 1}
t.join()
tensors = {}
for f in sorted(glob.glob(os.path.join(args["ckpt"], "*.safetensors"))):
    tensors.update(load_file(f))
names = list(tensors)
info = {"names": names, "dtype_names": [str(tensors[n].dtype).removeprefix("torch.") for n in names],
        "shapes": [list(tensors[n].shape) for n in names]}
answers = {"init": init["r"].json()}
if args["rounds"]:
    answers["start"] = httpx.post(url + "/start_weight_update", json={}, timeout=60).json()
t, upd = in_thread("/update_weights", {"update_info": info})
for n in names:
    dist.broadcast(tensors[n].contiguous(), 0, group=pg)
t.join()
answers["update"] = [upd["r"].status_code, upd["r"].json()]
if args["rounds"]:
    r = httpx.post(url + "/finish_weight_update", json={"weight_version": args["label"]}, timeout=60)
    answers["finish"] = [r.status_code, r.json()]
dist.destroy_process_group(pg)
print(json.dumps(answers), flush=True)
"""


def vllm_trainer(url: str, ckpt: str, rounds: bool, label: str | None = None) -> dict:
    args = {"url": url, "ckpt": ckpt, "port": free_port(), "rounds": rounds, "label": label}
    p = subprocess.run([sys.executable, "-c", VLLM_TRAINER, json.dumps(args)], capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt):
    return tiny_ckpt("qwen2", seed=0), tiny_ckpt("qwen2", seed=1)


@pytest.fixture(scope="module")
def refs(ckpts):
    return [hf_greedy(c, PROMPT, N_TOKENS) for c in ckpts]


@pytest.fixture(scope="module")
def server(ckpts, make_server):
    s = make_server(ckpts[0], "--max-num-seqs", "8")
    yield s
    s.stop()


def greedy(server) -> dict:
    r = httpx.post(server.url + "/inference/v1/generate", json={"token_ids": PROMPT, "sampling_params": {
        "max_tokens": N_TOKENS, "temperature": 0, "ignore_eos": True}}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def weight_info(server) -> dict:
    return server.control("/weight_info", method="GET")


def test_start_update_finish_from_a_raw_trainer(server, ckpts, refs):
    assert greedy(server)["token_ids"] == refs[0]
    before = weight_info(server)["engine_weight_version"]
    out = vllm_trainer(server.url, ckpts[1], rounds=True, label="step-7")
    assert out["init"]["message"] == "Weight transfer initialized"
    assert out["start"] == {"message": "Weight update started"}
    code, upd = out["update"]
    assert code == 200 and upd["message"] == "Weights updated" and upd["detail"]["staged"] is True
    code, fin = out["finish"]
    assert code == 200 and fin["message"] == "Weight update finished" and fin["weight_version"] == "step-7"
    info = weight_info(server)
    assert info == {"weight_version": "step-7", "engine_weight_version": before + 1}
    c = greedy(server)
    assert c["token_ids"] == refs[1] and c["weight_version"] == before + 1


def test_update_weights_without_a_round_commits_at_once(server, ckpts, refs):
    before = weight_info(server)["engine_weight_version"]
    out = vllm_trainer(server.url, ckpts[0], rounds=False)
    code, upd = out["update"]
    assert code == 200 and upd["detail"]["committed"] is True
    assert weight_info(server) == {"weight_version": str(before + 1), "engine_weight_version": before + 1}
    assert greedy(server)["token_ids"] == refs[0]


def test_weight_routes_refuse_what_they_cannot_do(server):
    h = server.admin_headers()
    r = httpx.post(server.url + "/finish_weight_update", json={}, headers=h, timeout=30)
    assert r.status_code == 409 and "start_weight_update" in r.json()["error"]["message"]
    info = {"names": ["a"], "dtype_names": ["float32"], "shapes": [[2]]}
    for bad, param in [({**info, "packed": True}, "update_info.packed"),
                       ({**info, "shapes": []}, "update_info.names"),
                       ({**info, "is_checkpoint_format": False}, "update_info.is_checkpoint_format"),
                       ({**info, "bogus": 1}, "update_info.bogus")]:
        r = httpx.post(server.url + "/update_weights", json={"update_info": bad}, headers=h, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    r = httpx.post(server.url + "/init_weight_transfer_engine", json={"init_info": {"master_address": "127.0.0.1"}},
                   headers=h, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("init_info.")
    server.control("/v1/destroy_weight_transfer", {})   # vLLM has no route for it: Tidal's
    r = httpx.post(server.url + "/update_weights", json={"update_info": info}, headers=h, timeout=30)
    assert r.status_code == 400 and "group" in r.json()["error"]["message"], r.text
