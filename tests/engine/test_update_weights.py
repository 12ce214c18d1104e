"""Transactional weight updates: A -> B gives HF's outputs on B; every injected failure leaves
A serving and the engine state unchanged; a request spanning a commit reports both versions."""
from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tidal import SamplingParams
from tidal.engine.control import tensor_sha256
from tidal.engine.messages import EngineError
from tidal.models.loader import iter_checkpoint

PROMPTS = [[5, 6, 7], [100, 101, 102, 103, 104, 105, 106, 107, 108], [42] * 13]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt):
    return tiny_ckpt("qwen2", seed=0), tiny_ckpt("qwen2", seed=1)


def hf_greedy(path: str) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              min_new_tokens=12)
        out.append(gen[0, len(p):].tolist())
    return out


def tokens(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_update_a_to_b_matches_hf_on_b(ckpts, make_llm):
    a, b = ckpts
    llm = make_llm(a)
    on_a = tokens(llm)
    res = llm.update_weights(path=b, version=5)
    assert res["weight_version"] == 5 and not res["skipped"] and res["num_tensors"] > 0
    on_b = tokens(llm)
    assert on_b != on_a
    assert on_b == hf_greedy(b)
    out = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.weight_version == 5
    assert llm.update_weights(path=b, version=5)["skipped"] is True   # duplicate: harmless
    # and from in-memory named tensors back to A
    llm.update_weights(named_tensors=dict(iter_checkpoint(a)), version=6)
    assert tokens(llm) == on_a


def _corrupt_copy(src: str, dst: str, how: str) -> str:
    shutil.copytree(src, dst)
    f = next(p for p in __import__("pathlib").Path(dst).glob("*.safetensors"))
    if how == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    else:
        tensors = load_file(str(f))
        name = next(n for n in tensors if "layers.1.mlp.down_proj" in n)
        if how == "missing":
            del tensors[name]
        elif how == "wrong_shape":
            tensors[name] = torch.zeros(3, 3)
        save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def _exploding(path: str, after: int):
    for i, item in enumerate(iter_checkpoint(path)):
        if i == after:
            raise RuntimeError("trainer died mid-transfer")
        yield item


@pytest.mark.parametrize("failure", ["missing", "wrong_shape", "truncated", "mid_load_exception",
                                     "bad_checksum", "unknown_name", "no_such_dir"])
def test_failed_update_leaves_a_serving(ckpts, make_llm, tmp_path, failure):
    a, b = ckpts
    llm = make_llm(a)
    on_a = tokens(llm)
    llm.pause("keep")
    before = llm.state()
    kwargs: dict = {"version": 9}
    if failure in ("missing", "wrong_shape", "truncated"):
        kwargs["path"] = _corrupt_copy(b, str(tmp_path / failure), failure)
    elif failure == "mid_load_exception":
        kwargs["named_tensors"] = _exploding(b, after=5)
    elif failure == "bad_checksum":
        name, t = next(iter(iter_checkpoint(b)))
        kwargs |= {"path": b, "checksums": {name: "0" * 64}}
    elif failure == "unknown_name":
        kwargs["named_tensors"] = {"model.layers.7.self_attn.q_proj.weight": torch.zeros(4, 4)}
    else:
        kwargs["path"] = str(tmp_path / "does-not-exist")
    with pytest.raises(EngineError):
        llm.update_weights(**kwargs)
    after = llm.state()
    for key in ("state", "weight_version", "num_running", "num_waiting", "kv_blocks_used", "pause_mode"):
        assert after[key] == before[key], key
    assert after["last_control_op"]["op"] == "update_weights" and "error" in after["last_control_op"]["result"]
    llm.resume()
    assert tokens(llm) == on_a


def test_checksums_accept_the_right_digest(ckpts, make_llm):
    a, b = ckpts
    llm = make_llm(a)
    name, t = next(iter(iter_checkpoint(b)))
    assert llm.update_weights(path=b, checksums={name: tensor_sha256(t)})["weight_version"] == 1


def test_keep_pause_across_update_reports_weight_spans(ckpts, make_llm):
    a, b = ckpts
    llm = make_llm(a)
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    result = {}
    t = threading.Thread(target=lambda: result.update(out=llm.generate([[1, 2, 3]], params, use_tqdm=False)))
    t.start()
    deadline = time.monotonic() + 20
    while llm.state()["step_count"] < 10:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    paused = llm.pause("keep")
    assert len(paused["kept"]) == 1
    n_before = paused["kept"][0]["num_output_tokens"]
    llm.update_weights(path=b, version=3)
    llm.resume()
    t.join(30)
    c = result["out"][0].outputs[0]
    assert c.weight_version == 3
    assert [(s.version, s.start, s.end) for s in c.weight_spans] == [(0, 0, n_before), (3, n_before, 300)]
