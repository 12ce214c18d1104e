"""Weight transfer into running `tidal serve` processes from trainer processes (issue 12).

Two servers serve checkpoint A; trainers in their own processes push checkpoint B — through
tidal.sync.WeightSender, or with nothing but torch.distributed and an HTTP client following
SGLang's per-tensor protocol. Every failure leaves both servers serving A at the old version.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.server.conftest import free_port

PROMPT = [5, 6, 7, 8]
N_TOKENS = 12

# A trainer process driven over stdin: each line is a JSON command, each answer one JSON line.
TRAINER = r"""
import json, os, sys, threading, torch, httpx
import torch.distributed as dist
from tidal.sync import WeightSender
from tidal.models.loader import iter_checkpoint

args = json.loads(sys.argv[1])
sender = WeightSender(args["urls"], backend=args["backend"], bucket_bytes=args.get("bucket_bytes", 64 << 10),
                      timeout_s=args.get("timeout_s", 30.0), staging=args.get("staging", "copy"),
                      direct_bytes=args.get("direct_bytes", 1 << 20))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "push":
        tensors = dict(iter_checkpoint(cmd["ckpt"]))
        for name, how in cmd.get("mutate", {}).items():
            if how == "shape":
                tensors[name] = torch.zeros(3, 3)
            elif how == "dtype":
                tensors[name] = tensors[name].to(torch.int32)
            elif how == "unknown":
                tensors["model.layers.9.mlp.up_proj.weight"] = tensors.pop(name)
        r = sender.push(tensors, cmd["version"])
        print(json.dumps({"ok": r.ok, "version": r.version, "replicas": r.replicas, "phases": r.phases}), flush=True)
    elif cmd["op"] == "close":
        sender.close()
        print(json.dumps({"closed": True}), flush=True)
        break
"""

# A trainer with torch.distributed and httpx only: its own default group, plus the named weight
# group created the way SGLang / OpenRLHF trainers create it; SGLang's per-tensor protocol.
RAW_TRAINER = r"""
import json, os, sys, threading, time, torch, httpx
import torch.distributed as dist
from datetime import timedelta
from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper, _world,
                                                rendezvous)
from safetensors.torch import load_file
import glob

args = json.loads(sys.argv[1])
urls, port, name = args["urls"], args["port"], args["group_name"]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args['default_port']}", rank=0, world_size=1)

def named_group(world):
    timeout = timedelta(seconds=30)
    store, rank, world = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, world, timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(world, 0, [], Backend("gloo"), PrefixStore(name, store),
                                      group_name=name, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world)}
    return pg

def post_all(path, bodies):
    out = [None] * len(urls)
    def go(i):
        out[i] = httpx.post(urls[i] + path, json=bodies[i], timeout=120).json()
    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(urls))]
    [t.start() for t in ts]
    return ts, out

world = len(urls) + 1
ts, inits = post_all("/init_weights_update_group", [
    {"master_address": "127.0.0.1", "master_port": port, "rank_offset": i + 1, "world_size": world,
     "group_name": name, "backend": "gloo"} for i in range(len(urls))])
pg = named_group(world)
[t.join() for t in ts]
tensors = {}
for f in sorted(glob.glob(os.path.join(args["ckpt"], "*.safetensors"))):
    tensors.update(load_file(f))
names = list(tensors)
shapes = [list(tensors[n].shape) for n in names]
if args.get("wrong_shape"):
    shapes[3] = [shapes[3][0] + 1] + shapes[3][1:]
body = {"names": names, "dtypes": [str(tensors[n].dtype).removeprefix("torch.") for n in names],
        "shapes": shapes, "group_name": name, "weight_version": str(args["version"]), "flush_cache": True}
ts, updates = post_all("/update_weights_from_distributed", [body] * len(urls))
for i, (n, shape) in enumerate(zip(names, shapes)):
    if args.get("die_after") is not None and i == args["die_after"]:
        os._exit(3)
    t = tensors[n] if list(tensors[n].shape) == shape else torch.zeros(shape, dtype=tensors[n].dtype)
    dist.broadcast(t.contiguous(), 0, group=pg)
[t.join() for t in ts]
[t.join() for t in post_all("/destroy_weights_update_group", [{"group_name": name}] * len(urls))[0]]
dist.destroy_process_group(pg)
x = torch.ones(1)
dist.all_reduce(x)   # the trainer's own default group still works
print(json.dumps({"inits": inits, "updates": updates, "default_group_ok": x.item() == 1.0}), flush=True)
dist.destroy_process_group()
# torch's gloo/TCPStore threads can still abort the process (SIGABRT) in static destructors at
# interpreter exit, after all the work is done: leave without running them.
os._exit(0)
"""


class Trainer:
    def __init__(self, urls: list[str], backend: str = "gloo", **kw) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", TRAINER, json.dumps({"urls": urls, "backend": backend, **kw})],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._read(120)["ready"]

    def _read(self, timeout: float) -> dict:
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        assert box and box[0], f"trainer gave no answer within {timeout}s (exit code {self.proc.poll()})"
        return json.loads(box[0])

    def push(self, ckpt: str, version: int, timeout: float = 120, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": "push", "ckpt": ckpt, "version": version, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "close"}) + "\n")
            self.proc.stdin.flush()
            self._read(60)
            self.proc.wait(30)


def raw_trainer(urls: list[str], ckpt: str, version: int, timeout: float = 120, **kw) -> tuple[int, dict | None]:
    args = {"urls": urls, "ckpt": ckpt, "version": version, "port": free_port(), "default_port": free_port(),
            "group_name": "raw-trainer-group", **kw}
    p = subprocess.run([sys.executable, "-c", RAW_TRAINER, json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode not in (0, kw.get("die_after") is not None and 3):
        print(p.stderr[-3000:])
    return p.returncode, json.loads(lines[-1]) if lines else None


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt):
    return tiny_ckpt("qwen2", seed=0), tiny_ckpt("qwen2", seed=1)


@pytest.fixture(scope="module")
def servers(ckpts, make_server):
    pair = [make_server(ckpts[0], "--max-num-seqs", "8"), make_server(ckpts[0], "--max-num-seqs", "8")]
    yield pair
    for s in pair:
        s.stop()


def hf_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def refs(ckpts):
    return {"A": hf_greedy(ckpts[0], PROMPT, N_TOKENS), "B": hf_greedy(ckpts[1], PROMPT, N_TOKENS)}


def generate(server, prompt=PROMPT, n=N_TOKENS) -> dict:
    r = httpx.post(server.url + "/generate", json={"input_ids": prompt, "sampling_params": {
        "max_tokens": n, "temperature": 0, "ignore_eos": True}}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def state(server) -> dict:
    return server.control("/v1/state", method="GET")


def snapshot(server) -> dict:
    st = state(server)
    return {k: st[k] for k in ("state", "weight_version", "num_running", "num_waiting", "pause_mode", "fenced")}


def serving(servers, refs, which: str) -> None:
    for s in servers:
        out = generate(s)
        assert out["output_ids"] == refs[which], (s.url, which)


def test_push_b_into_two_servers(servers, refs, ckpts):
    a, b = ckpts
    serving(servers, refs, "A")
    for s in servers:   # fill the prefix cache under A: the same prompt twice
        generate(s, PROMPT * 3)
        generate(s, PROMPT * 3)
    hits_before = [state(s)["prefix_cache_hit_tokens"] for s in servers]
    assert all(h > 0 for h in hits_before)
    version = state(servers[0])["weight_version"] + 1
    trainer = Trainer([s.url for s in servers])
    try:
        r = trainer.push(b, version)
        assert r["ok"], r
        assert set(r["phases"]) >= {"pack", "wire", "stage", "commit", "total"}
        for s in servers:
            st = state(s)
            assert st["weight_version"] == version and st["state"] == "serving" and st["fenced"] is None
            again = generate(s, PROMPT * 3)  # under B: nothing computed under A may be reused
            assert state(s)["prefix_cache_hit_tokens"] == st["prefix_cache_hit_tokens"]
            assert again["weight_version"] == version
        serving(servers, refs, "B")
        assert trainer.push(a, version + 1)["ok"]   # back to A: a second push on the same group
        serving(servers, refs, "A")
    finally:
        trainer.close()
    for s in servers:
        assert state(s)["weight_transfer"]["group"] is None   # close() destroyed it


def test_direct_buckets_and_a_check_once_per_spec_set(servers, refs, ckpts):
    """Tensors of at least direct_bytes go on the wire from the trainer's own memory, the rest
    packed; a repeat push of the same specs skips the check round trip, and a replica that would
    now refuse still rolls both back without leaving the trainer blocked."""
    a, b = ckpts
    s0, s1 = servers
    v = state(s0)["weight_version"]
    trainer = Trainer([s.url for s in servers], direct_bytes=4096)
    try:
        r = trainer.push(b, v + 1)
        assert r["ok"] and r["phases"]["check"] > 0, r
        serving(servers, refs, "B")
        r = trainer.push(a, v + 2)   # same names, shapes and dtypes: no check round trip
        assert r["ok"] and r["phases"]["check"] == 0, r
        serving(servers, refs, "A")
        before = [snapshot(s) for s in servers]
        name, t, path = _shm_tensor(b)   # s1 now holds a staged update: it refuses to stage
        try:
            s1.control("/v1/update_weights_from_shm", {"shm_path": path, "commit": False, "tensors": [
                {"name": name, "dtype": "float32", "shape": list(t.shape), "offset": 0}]})
        finally:
            os.unlink(path)
        t0 = time.monotonic()
        r = trainer.push(b, v + 3, timeout=60)
        assert not r["ok"] and time.monotonic() - t0 < 30, r
        assert r["phases"]["check"] == 0 and "is staged" in r["replicas"][s1.url]["error"], r
        assert [snapshot(s) for s in servers] == before
        assert state(s0)["weight_transfer"]["staged_version"] is None   # the sender aborted s0
        serving(servers, refs, "A")
        s1.control("/v1/abort_staged")
        r = trainer.push(b, v + 3)   # after a failure the check runs again
        assert r["ok"] and r["phases"]["check"] > 0, r
        serving(servers, refs, "B")
        assert trainer.push(a, v + 4)["ok"]
    finally:
        trainer.close()


def test_one_replica_commits_with_its_staging_call(servers, refs, ckpts):
    a, b = ckpts
    s = servers[0]
    v = state(s)["weight_version"]
    trainer = Trainer([s.url])
    try:
        r = trainer.push(b, v + 1)
        assert r["ok"] and r["replicas"][s.url]["committed"] and r["replicas"][s.url]["weight_version"] == v + 1, r
        assert r["phases"]["commit"] > 0 and state(s)["weight_transfer"]["staged_version"] is None
        serving([s], refs, "B")
        assert trainer.push(a, v + 2)["ok"]
        serving([s], refs, "A")
    finally:
        trainer.close()


@pytest.mark.parametrize("backend", ["gloo", "shm"])
def test_in_place_push_into_two_servers(servers, refs, ckpts, backend):
    """staging="in_place" over HTTP, transactional as ever: stage (written in place, generation
    held) on both, then commit on both."""
    a, b = ckpts
    version = state(servers[0])["weight_version"] + 1
    trainer = Trainer([s.url for s in servers], backend=backend, staging="in_place")
    try:
        r = trainer.push(b, version)
        assert r["ok"], r
        assert all(state(s)["weight_version"] == version for s in servers)
        serving(servers, refs, "B")
        assert trainer.push(a, version + 1)["ok"]
        assert all(not state(s)["weight_transfer"]["writing_in_place"] for s in servers)
        serving(servers, refs, "A")
    finally:
        trainer.close()


def test_plain_torch_distributed_trainer(servers, refs, ckpts):
    a, b = ckpts
    version = state(servers[0])["weight_version"] + 1
    code, out = raw_trainer([s.url for s in servers], b, version)
    assert code == 0 and out is not None, out
    assert all(r["success"] for r in out["inits"]) and all(r["success"] for r in out["updates"]), out
    assert out["default_group_ok"]
    for s in servers:
        assert state(s)["weight_version"] == version
    serving(servers, refs, "B")
    code, out = raw_trainer([s.url for s in servers], a, version + 1)  # a new group each time: re-init works
    assert code == 0 and all(r["success"] for r in out["updates"]), out
    serving(servers, refs, "A")


def _stream(server, prompt: list[int], n: int, first: threading.Event, into: dict) -> None:
    body = {"input_ids": prompt, "stream": True, "incremental_streaming_output": True,
            "sampling_params": {"max_tokens": n, "temperature": 0, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            into.setdefault("ids", []).extend(ev["output_ids"])
            if len(into["ids"]) >= 3:
                first.set()
            if ev.get("finish_reason"):
                into["final"] = ev


def test_requests_stream_through_a_push_without_pause(servers, refs, ckpts):
    a, b = ckpts
    s = servers[0]
    n = 400
    v0 = state(s)["weight_version"]
    trainer = Trainer([x.url for x in servers])
    prompts = [PROMPT, [9, 10, 11]]
    on_a = [generate(s, p, n)["output_ids"] for p in prompts]   # Tidal's own greedy runs as the reference
    try:
        results = [{} for _ in prompts]
        started = [threading.Event() for _ in prompts]
        threads = [threading.Thread(target=_stream, args=(s, p, n, e, r)) for p, e, r in zip(prompts, started, results)]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(60)
        r = trainer.push(b, v0 + 1)
        assert r["ok"], r
        # both requests were running: they recompute their KV under B (no --kv-refresh)
        assert r["replicas"][s.url]["recomputed"] == 2 and r["replicas"][s.url]["refreshed"] == 0, r
        for t in threads:
            t.join(120)
        for prompt, res in zip(prompts, results):
            final = res["final"]
            assert final["finish_reason"] == "length" and len(res["ids"]) == n
            spans = final["weight_spans"]
            assert [sp[0] for sp in spans] == [v0, v0 + 1], spans   # the commit landed mid-request
            k = spans[0][2]
            assert 0 < k < n and spans == [[v0, 0, k], [v0 + 1, k, n]]
            before, after = res["ids"][:k], res["ids"][k:]
            assert before == on_a[prompts.index(prompt)][:k]
            assert after == generate(s, prompt + before, n - k)["output_ids"]   # s serves B now
        assert trainer.push(a, v0 + 2)["ok"]
    finally:
        trainer.close()


@pytest.mark.parametrize("how", ["shape", "unknown", "dtype"])
def test_rejected_push_leaves_a_serving(servers, refs, ckpts, how):
    a, b = ckpts
    before = [snapshot(s) for s in servers]
    trainer = Trainer([s.url for s in servers])
    try:
        t0 = time.monotonic()
        r = trainer.push(b, before[0]["weight_version"] + 1, mutate={"model.layers.1.mlp.down_proj.weight": how})
        assert not r["ok"] and time.monotonic() - t0 < 30   # answered, not blocked in a collective
        assert all("error" in rep and rep["phase"] == "check" for rep in r["replicas"].values()), r
        assert [snapshot(s) for s in servers] == before
        serving(servers, refs, "A")
        assert trainer.push(b, before[0]["weight_version"] + 1)["ok"]   # a later push succeeds
        serving(servers, refs, "B")
        assert trainer.push(a, before[0]["weight_version"] + 2)["ok"]
    finally:
        trainer.close()


def test_sglang_protocol_wrong_shape_does_not_block_the_trainer(servers, refs, ckpts):
    a, b = ckpts
    before = [snapshot(s) for s in servers]
    code, out = raw_trainer([s.url for s in servers], b, before[0]["weight_version"] + 1, wrong_shape=True, timeout=90)
    assert code == 0 and out is not None   # every broadcast completed: the engines consumed them
    assert not any(r["success"] for r in out["updates"]) and "shape" in out["updates"][0]["message"]
    assert [snapshot(s) for s in servers] == before
    for s in servers:
        st = state(s)
        assert st["weight_transfer"]["group"] is None and "shape" in st["weight_transfer"]["last_failure"]["error"]
    serving(servers, refs, "A")


def test_trainer_killed_mid_broadcast(servers, refs, ckpts):
    a, b = ckpts
    before = [snapshot(s) for s in servers]
    t0 = time.monotonic()
    code, out = raw_trainer([s.url for s in servers], b, before[0]["weight_version"] + 1, die_after=5, timeout=90)
    assert code == 3
    deadline = time.monotonic() + 60
    for s in servers:   # the engines fail the update within the deadline and drop the group
        while state(s)["weight_transfer"]["busy"] is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        st = state(s)
        assert st["weight_transfer"]["group"] is None and st["weight_transfer"]["last_failure"] is not None
    assert time.monotonic() - t0 < 90
    assert [snapshot(s) for s in servers] == before
    serving(servers, refs, "A")
    code, out = raw_trainer([s.url for s in servers], a, before[0]["weight_version"] + 1)
    assert code == 0 and all(r["success"] for r in out["updates"]), out
    serving(servers, refs, "A")


def _shm_tensor(ckpt: str) -> tuple[str, torch.Tensor, str]:
    from tidal.models.loader import iter_checkpoint
    name, t = next(iter(iter_checkpoint(ckpt)))
    path = f"/dev/shm/tidal-test-{time.time_ns()}"
    seg = torch.from_file(path, shared=True, size=t.numel() * t.element_size(), dtype=torch.uint8)
    seg.copy_(t.contiguous().reshape(-1).view(torch.uint8))
    return name, t, path


def test_checksum_mismatch_and_staged_abort(servers, refs, ckpts):
    from tidal.engine.weights import tensor_sha256
    a, b = ckpts
    s = servers[0]
    before = snapshot(s)
    name, t, path = _shm_tensor(b)
    try:
        body = {"shm_path": path, "tensors": [{"name": name, "dtype": "float32", "shape": list(t.shape), "offset": 0}],
                "checksums": {name: "0" * 64}}
        r = httpx.post(s.url + "/v1/update_weights_from_shm", json=body, timeout=60)
        assert r.status_code >= 400 and "checksum" in r.text
        assert snapshot(s) == before
        assert "checksum" in state(s)["weight_transfer"]["last_failure"]["error"]
        body["checksums"] = {name: tensor_sha256(t)}
        body["version"] = before["weight_version"] + 1
        body["commit"] = False    # staged and held: still serving A until commit_weights
        assert s.control("/v1/update_weights_from_shm", body)["staged"]
        serving([s], refs, "A")
        assert s.control("/v1/abort_staged")["aborted"]
        assert snapshot(s) == before
    finally:
        os.unlink(path)


def test_one_replica_failing_to_stage_rolls_back_the_other(servers, refs, ckpts):
    a, b = ckpts
    s0, s1 = servers
    before = [snapshot(s) for s in servers]
    # s1 holds an unrelated staged update, so it refuses to stage another (after the check passed).
    name, t, path = _shm_tensor(b)
    try:
        s1.control("/v1/update_weights_from_shm", {"shm_path": path, "commit": False, "tensors": [
            {"name": name, "dtype": "float32", "shape": list(t.shape), "offset": 0}]})
    finally:
        os.unlink(path)
    trainer = Trainer([s.url for s in servers])
    try:
        r = trainer.push(b, before[0]["weight_version"] + 1)
        assert not r["ok"]
        assert "is staged" in r["replicas"][s1.url]["error"], r
        assert "error" not in r["replicas"][s0.url]          # s0 staged; the sender aborted it
        assert [snapshot(s) for s in servers] == before
        assert state(s0)["weight_transfer"]["staged_version"] is None
        serving(servers, refs, "A")
        s1.control("/v1/abort_staged")
        assert trainer.push(b, before[0]["weight_version"] + 1)["ok"]
        serving(servers, refs, "B")
        assert trainer.push(a, before[0]["weight_version"] + 2)["ok"]
    finally:
        trainer.close()


def test_fenced_replica_refuses_generation(servers):
    s = servers[1]
    s.control("/v1/fence", {"reason": "test"})
    try:
        assert _eventually_fenced(s)
        r = httpx.post(s.url + "/generate", json={"input_ids": PROMPT, "sampling_params": {"max_tokens": 2}},
                       timeout=30)
        assert r.status_code >= 400
        assert state(s)["fenced"]
    finally:
        # a push that commits clears the fence
        trainer = Trainer([s.url])
        try:
            from tidal.models.loader import iter_checkpoint  # noqa: F401
            assert trainer.push(state_ckpt(s), state(s)["weight_version"] + 1)["ok"]
        finally:
            trainer.close()
    assert state(s)["fenced"] is None


def _eventually_fenced(s, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(s.url + "/health", timeout=10).json().get("fenced"):
            return True
        time.sleep(0.1)
    return False


def state_ckpt(s) -> str:
    return httpx.get(s.url + "/v1/models", headers=s.admin_headers(), timeout=10).json()["data"][0]["root"]


def test_shm_push_matches_gloo(servers, refs, ckpts):
    a, b = ckpts
    v = state(servers[0])["weight_version"]
    trainer = Trainer([s.url for s in servers], backend="shm")
    try:
        r = trainer.push(b, v + 1)
        assert r["ok"], r
        serving(servers, refs, "B")   # the same outputs the gloo push gave
        assert trainer.push(a, v + 2)["ok"]
        serving(servers, refs, "A")
    finally:
        trainer.close()
