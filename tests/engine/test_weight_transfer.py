"""Engine-side weight transfer (issue 12) with the offline LLM and a trainer in its own process:
the named group, per-tensor and bucketed receives, subsets mapped onto fused parameters, the
call's deadline, rejected updates that still consume the trainer's broadcasts, and from-disk
staging off the core thread (a FIFO named *.safetensors is refused, not read)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.server.conftest import free_port
from tidal import SamplingParams
from tidal.engine.messages import EngineError, EngineInvalidInput
from tidal.engine.weight_transfer import parse_buckets as wt_parse
from tidal.models.loader import iter_checkpoint
from tidal.sync import _meta, _plan

PROMPTS = [[5, 6, 7], [42] * 9]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

TRAINER = r"""
import json, os, sys, time, torch
import torch.distributed as dist
from tidal.engine.weight_transfer import destroy_group, join_group
from tidal.models.loader import iter_checkpoint
from tidal.sync import _pack, _plan, _bucket_bytes

a = json.loads(sys.argv[1])
g = join_group("127.0.0.1", a["port"], 0, 2, a["group"], "gloo", 30)
tensors = [(n, t) for n, t in iter_checkpoint(a["ckpt"]) if a.get("names") is None or n in a["names"]]
if a.get("idle"):
    time.sleep(a["idle"])            # a trainer that never sends (bounded: the test's deadline is shorter)
elif a.get("layout") == "bucketed":
    for bucket in _plan(tensors, a["bucket_bytes"]):
        buf = torch.empty(_bucket_bytes(bucket), dtype=torch.uint8)
        _pack(bucket, buf)
        dist.broadcast(buf, 0, group=g.pg)
else:
    for n, t in tensors:
        if a.get("wrong_shape") == n:
            t = torch.zeros(3, 3)
        dist.broadcast(t.contiguous(), 0, group=g.pg)
destroy_group(g)
print("sent", flush=True)
# torch's gloo/TCPStore threads can abort the process (SIGABRT) in static destructors at
# interpreter exit, after all the work is done: leave without running them.
os._exit(0)
"""


def start_trainer(**args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRAINER, json.dumps(args)], stdout=subprocess.PIPE, text=True)


def specs_of(tensors) -> list[dict]:
    return [{"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for n, t in tensors]


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt):
    return tiny_ckpt("qwen2", seed=0), tiny_ckpt("qwen2", seed=1)


def tokens(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def join(llm, group: str = "g", **trainer_args) -> subprocess.Popen:
    port = free_port()
    proc = start_trainer(port=port, group=group, **trainer_args)
    res = llm.init_weight_transfer("127.0.0.1", port, 1, 2, group, timeout_s=60)
    assert res["rank"] == 1 and res["world_size"] == 2
    return proc


@pytest.mark.parametrize("layout", ["per_tensor", "bucketed"])
def test_receive_b_matches_b(ckpts, make_llm, layout):
    a, b = ckpts
    ref = make_llm(b)
    on_b = tokens(ref)
    llm = make_llm(a)
    on_a = tokens(llm)
    assert on_a != on_b
    tensors = list(iter_checkpoint(b))
    proc = join(llm, ckpt=b, layout=layout, bucket_bytes=40_000)
    if layout == "bucketed":
        buckets = [{"nbytes": max(p.offset + p.nbytes for p in bk), "tensors": [_meta(p) for p in bk]}
                   for bk in _plan(tensors, 40_000)]
        assert len(buckets) > 2
        res = llm.update_weights(source="distributed", group_name="g", layout="bucketed", buckets=buckets,
                                 version=4, timeout_s=60)
    else:
        res = llm.update_weights(source="distributed", group_name="g", tensors=specs_of(tensors), version=4,
                                 timeout_s=60)
    assert proc.wait(60) == 0
    assert res["weight_version"] == 4 and res["num_tensors"] == len(tensors)
    assert tokens(llm) == on_b
    assert llm.destroy_weight_transfer("g")["destroyed"]
    assert llm.state()["weight_transfer"]["group"] is None


def test_plan_sends_large_contiguous_tensors_directly_and_packs_the_rest():
    from tidal.sync import _ALIGN, _as_bytes, _bucket_bytes, _pack
    g = torch.Generator().manual_seed(0)
    big = torch.randn(40, 30, generator=g)                    # 4800 bytes, contiguous
    strided = torch.randn(30, 40, generator=g).t()            # as large, but not contiguous
    small = [(f"s{i}", torch.randn(7 + i, generator=g).to(torch.bfloat16)) for i in range(5)]
    items = [("big", big), ("strided", strided), *small]
    buckets = _plan(items, 2048, direct_bytes=1024, device=torch.device("cpu"))
    direct = [bk for bk in buckets if bk[0].direct]
    assert [[p.name for p in bk] for bk in direct] == [["big"]] and direct[0][0].offset == 0
    packed = [p for bk in buckets if not bk[0].direct for p in bk]
    assert sorted(p.name for p in packed) == sorted(["strided"] + [n for n, _ in small])
    assert all(p.offset % _ALIGN == 0 for p in packed)
    assert torch.equal(_as_bytes(big).view(torch.float32).view(40, 30), big)
    for bk in buckets:
        if bk[0].direct:
            continue
        buf = torch.zeros(_bucket_bytes(bk), dtype=torch.uint8)
        _pack(bk, buf)
        for p in bk:
            got = buf[p.offset:p.offset + p.nbytes].view(p.tensor.dtype).view(p.tensor.shape)
            assert torch.equal(got, p.tensor), p.name
    # without direct_bytes every tensor is packed (the layout older senders produce)
    assert not any(p.direct for bk in _plan(items, 2048) for p in bk)


def test_a_name_in_two_buckets_is_rejected(ckpts, make_llm):
    a, _ = ckpts
    llm = make_llm(a)
    name, t = next(iter(iter_checkpoint(a)))
    spec = {"name": name, "dtype": "float32", "shape": list(t.shape), "offset": 0}
    buckets = wt_parse([{"nbytes": t.numel() * 4, "tensors": [spec]}] * 2)
    with pytest.raises(EngineInvalidInput, match="at most once"):
        llm.engine.core.control.weights.check_specs([s for b in buckets for s in b.tensors])


def test_staging_arena_is_reused_across_updates(ckpts, make_llm):
    a, b = ckpts
    llm = make_llm(a)
    on_a = tokens(llm)
    arena = llm.engine.core.control.weights.arena
    ptrs = []
    for ckpt, version in ((b, 2), (a, 3)):
        tensors = list(iter_checkpoint(ckpt))
        proc = join(llm, ckpt=ckpt, layout="bucketed", bucket_bytes=40_000)
        buckets = [{"nbytes": max(p.offset + p.nbytes for p in bk), "tensors": [_meta(p) for p in bk]}
                   for bk in _plan(tensors, 40_000)]
        llm.update_weights(source="distributed", group_name="g", layout="bucketed", buckets=buckets,
                           version=version, timeout_s=60)
        assert proc.wait(60) == 0
        ptrs.append(arena.buf.data_ptr())
        assert llm.destroy_weight_transfer("g")["destroyed"]
    assert ptrs[0] == ptrs[1]   # the second update received into the same memory
    assert tokens(llm) == on_a
    llm.pause()
    llm.sleep(["kv_cache"])
    assert arena.buf is None    # a sleeping engine holds no staging memory
    llm.wake_up()
    llm.resume()
    assert tokens(llm) == on_a


def test_subset_lands_in_fused_parameters(ckpts, make_llm):
    a, b = ckpts
    llm = make_llm(a)
    model = llm.engine.core.runner.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    b_tensors = dict(iter_checkpoint(b))
    proc = join(llm, ckpt=b, names=names)
    llm.update_weights(source="distributed", group_name="g", tensors=specs_of((n, b_tensors[n]) for n in names),
                       timeout_s=60)
    assert proc.wait(60) == 0
    params = dict(model.named_parameters())
    arch = model.arch
    q, kv, inter = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.intermediate_size
    qkv = params["model.layers.0.self_attn.qkv_proj.weight"]
    assert torch.equal(qkv[q:q + kv], b_tensors[names[0]])
    assert torch.equal(qkv[:q], before["model.layers.0.self_attn.qkv_proj.weight"][:q])   # q untouched
    gate_up = params["model.layers.1.mlp.gate_up_proj.weight"]
    assert torch.equal(gate_up[inter:], b_tensors[names[1]])
    assert torch.equal(gate_up[:inter], before["model.layers.1.mlp.gate_up_proj.weight"][:inter])
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"}


def test_deadline_bounds_a_silent_trainer_and_generation_keeps_running(ckpts, make_llm):
    a, b = ckpts
    llm = make_llm(a)
    on_a = tokens(llm)
    before = llm.state()
    proc = join(llm, ckpt=b, idle=60)
    errors: list[BaseException] = []
    t0 = time.monotonic()
    t = threading.Thread(target=lambda: _catch(errors, lambda: llm.update_weights(
        source="distributed", group_name="g", tensors=specs_of(iter_checkpoint(b)), version=3, timeout_s=3)))
    t.start()
    assert tokens(llm) == on_a          # the core loop serves while the receive waits
    t.join(30)
    elapsed = time.monotonic() - t0
    proc.kill()
    proc.wait()
    assert len(errors) == 1 and isinstance(errors[0], EngineError) and "broadcast" in str(errors[0])
    assert 2.5 < elapsed < 20
    after = llm.state()
    assert after["weight_version"] == before["weight_version"] and after["state"] == before["state"]
    assert after["weight_transfer"]["group"] is None and after["weight_transfer"]["last_failure"] is not None
    assert llm.engine.core.control.weights.arena.buf is None   # a receive may still be posted into it
    assert tokens(llm) == on_a
    # a new init and update succeed
    proc = join(llm, ckpt=b)
    llm.update_weights(source="distributed", group_name="g", tensors=specs_of(iter_checkpoint(b)), timeout_s=60)
    assert proc.wait(60) == 0
    assert tokens(llm) != on_a


def test_rejected_update_still_consumes_the_broadcasts(ckpts, make_llm):
    a, b = ckpts
    llm = make_llm(a)
    on_a = tokens(llm)
    llm.pause("keep")
    before = llm.state()
    bad = "model.layers.1.mlp.down_proj.weight"
    specs = [s if s["name"] != bad else {**s, "shape": [3, 3]} for s in specs_of(iter_checkpoint(b))]
    proc = join(llm, ckpt=b, wrong_shape=bad)
    with pytest.raises(EngineInvalidInput, match="down_proj"):
        llm.update_weights(source="distributed", group_name="g", tensors=specs, version=8, timeout_s=60)
    assert proc.wait(60) == 0            # every broadcast completed: the trainer was not left blocked
    after = llm.state()
    for key in ("state", "pause_mode", "weight_version", "num_running", "num_waiting"):
        assert after[key] == before[key], key
    llm.resume()
    assert tokens(llm) == on_a


def test_update_from_a_fifo_is_refused_without_freezing(ckpts, make_llm, tmp_path):
    a, b = ckpts
    llm = make_llm(a)
    d = tmp_path / "fifo-ckpt"
    d.mkdir()
    shutil.copy(os.path.join(b, "config.json"), d / "config.json")
    os.mkfifo(d / "model.safetensors")
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="not a regular file"):
        llm.update_weights(path=str(d), timeout_s=10)
    assert time.monotonic() - t0 < 10
    assert llm.state()["state"] == "serving"


def test_disk_staging_runs_off_the_core_thread(ckpts, make_llm):
    a, b = ckpts
    llm = make_llm(a)
    gate = threading.Event()
    steps_during: list[int] = []

    def slow_b():   # a source that waits while the engine keeps stepping
        for i, item in enumerate(iter_checkpoint(b)):
            if i == 1:
                assert gate.wait(30)
            yield item

    res: dict = {}
    t = threading.Thread(target=lambda: res.update(r=llm.update_weights(named_tensors=slow_b(), version=2,
                                                                        timeout_s=60)))
    t.start()
    s0 = llm.state()["step_count"]
    tokens(llm)                          # generation completes while the update is staging
    steps_during.append(llm.state()["step_count"] - s0)
    gate.set()
    t.join(60)
    assert steps_during[0] > 0 and res["r"]["weight_version"] == 2


def _catch(errors: list, fn) -> None:
    try:
        fn()
    except BaseException as e:
        errors.append(e)
