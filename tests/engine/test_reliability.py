"""Engine-side defects of issue 10: a failed or stale wake never serves weights it did not load,
requests that can never be scheduled are rejected at admission instead of blocking the queue,
state() polls stay small, and bad checkpoints are bad input (EngineInvalidInput)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from tidal import SamplingParams
from tidal.engine.control import tensor_sha256
from tidal.engine.core import EngineCore
from tidal.config import EngineConfig
from tidal.engine.messages import AddRequest, EngineError, EngineInvalidInput
from tidal.models.loader import INDEX_FILE, iter_checkpoint

PROMPTS = [[5, 6, 7], [100, 101, 102, 103, 104, 105, 106, 107, 108]]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt):
    return tiny_ckpt("qwen2", seed=0), tiny_ckpt("qwen2", seed=1)


def tokens(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def weights_file(path: str) -> str:
    return os.path.join(path, "model.safetensors")


# -- item 1: a failed wake leaves the weights asleep ----------------------------------------
def test_failed_wake_leaves_weights_asleep_and_never_serves_placeholders(ckpts, make_llm, tmp_path):
    src = shutil.copytree(ckpts[0], tmp_path / "latest")
    llm = make_llm(str(src))
    ref = tokens(llm)
    llm.pause("abort")
    llm.sleep(["weights"], discard=True)
    st = llm.state()
    assert st["weights_loaded"] is False and st["sleeping"] == ["weights"]
    with pytest.raises(EngineError, match="wake_up first"):
        llm.resume()
    moved = shutil.move(str(src), tmp_path / "elsewhere")
    for _ in range(2):  # a second wake must not succeed with nothing restored
        with pytest.raises(EngineError, match="can no longer be loaded.*stay asleep"):
            llm.wake_up(["weights"])
        st = llm.state()
        assert st["state"] == "sleeping" and st["sleeping"] == ["weights"] and st["weights_loaded"] is False
        assert st["memory_bytes"]["weights"] == 0  # nothing half-restored
    with pytest.raises(EngineError):
        llm.resume()
    shutil.move(moved, src)
    llm.wake_up(["weights"])
    assert llm.state()["weights_loaded"] is True
    llm.resume()
    assert tokens(llm) == ref


def test_failed_wake_from_bad_checkpoint_puts_placeholders_back(ckpts, make_llm, tmp_path):
    src = shutil.copytree(ckpts[0], tmp_path / "m")
    llm = make_llm(str(src))
    llm.pause("abort")
    llm.sleep(["weights", "kv_cache"], discard=True)
    data = open(weights_file(str(src)), "rb").read()
    with open(weights_file(str(src)), "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(EngineError):
        llm.wake_up()
    st = llm.state()
    # weights are restored first; their failure leaves both tags asleep
    assert st["state"] == "sleeping" and st["sleeping"] == ["kv_cache", "weights"]
    assert all(p.numel() == 0 for p in llm.engine.core.runner.model.parameters())


# -- item 2: wake after discard refuses a changed source --------------------------------------
@pytest.mark.parametrize("keep_mtime", [False, True], ids=["overwritten", "overwritten_same_mtime"])
def test_wake_after_discard_refuses_a_checkpoint_overwritten_in_place(ckpts, make_llm, tmp_path, keep_mtime):
    a, b = ckpts
    latest = str(shutil.copytree(a, tmp_path / "latest"))
    llm = make_llm(latest)
    on_a = tokens(llm)
    llm.pause("abort")
    llm.sleep(["weights"], discard=True)
    st = os.stat(weights_file(latest))
    shutil.copyfile(weights_file(b), weights_file(latest))   # the trainer's next checkpoint
    if keep_mtime:  # same size and mtime: only the content digest tells them apart
        os.utime(weights_file(latest), ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(EngineError, match=rf"{latest}.*not the one loaded as weight_version=0: "
                                          rf"model.safetensors changed \((mtime_ns|digest)"):
        llm.wake_up(["weights"])
    state = llm.state()
    assert state["state"] == "sleeping" and state["sleeping"] == ["weights"] and state["weight_version"] == 0
    # The way out: load the new checkpoint under a new version in place of the discarded weights.
    res = llm.update_weights(path=latest, version=1)
    assert res["weight_version"] == 1
    state = llm.state()
    assert state["state"] == "paused" and state["sleeping"] == [] and state["weights_loaded"] is True
    llm.resume()
    on_b = tokens(llm)
    assert on_b != on_a and on_b == tokens(make_llm(b))


def test_wake_after_discard_reloads_an_unchanged_updated_checkpoint(ckpts, make_llm):
    a, b = ckpts
    llm = make_llm(a)
    llm.update_weights(path=b, version=3)
    on_b = tokens(llm)
    llm.pause("abort")
    llm.sleep(["weights"], discard=True)
    llm.wake_up()
    llm.resume()
    assert tokens(llm) == on_b and llm.state()["weight_version"] == 3


# -- item 3: admission -------------------------------------------------------------------------
def test_n_above_max_num_seqs_is_rejected_naming_n(ckpts, make_llm):
    llm = make_llm(ckpts[0], max_num_seqs=4)
    with pytest.raises(EngineInvalidInput, match=r"n=5 .*max_num_seqs=4") as e:
        llm.generate([[1, 2, 3]], SamplingParams(n=5, max_tokens=4), use_tqdm=False)
    assert e.value.field == "n"
    assert tokens(llm)  # the engine still serves


async def test_unschedulable_request_does_not_block_the_one_behind_it(ckpts, make_engine):
    eng = make_engine(ckpts[0], max_num_seqs=4)

    async def run(params):
        return [o async for o in eng.generate([7, 8, 9], params)][-1]

    bad = asyncio.create_task(run(SamplingParams(n=6, max_tokens=4)))
    good = asyncio.create_task(run(SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    done, _ = await asyncio.wait([bad, good], timeout=60)
    assert good in done and bad in done, "a request was never answered"
    assert len(good.result().outputs[0].token_ids) == 6
    with pytest.raises(EngineInvalidInput) as e:
        bad.result()
    assert e.value.field == "n"


def _core(path: str, **kw) -> tuple[EngineCore, list]:
    outs: list = []
    got = threading.Event()

    def handler(batch):
        outs.extend(batch)
        got.set()

    kw = {"dtype": "float32", "device": "cpu", "block_size": 4, **kw}
    core = EngineCore(EngineConfig(model=path, **kw), handler)
    core.start()
    core.got = got
    return core, outs


def _finished(outs, rid):
    return [o for o in outs if o.request_id == rid and o.finish_reason is not None]


def _wait(core, outs, rids, timeout=60.0):
    import time
    deadline = time.monotonic() + timeout
    while not all(_finished(outs, r) for r in rids):
        assert time.monotonic() < deadline, f"no final output for {[r for r in rids if not _finished(outs, r)]}"
        core.got.wait(0.5)
        core.got.clear()


def test_engine_core_rejects_prompts_that_cannot_fit_and_serves_the_rest(ckpts):
    core, outs = _core(ckpts[0], num_kv_blocks=16)   # 64 tokens of KV: max_model_len lowered to it
    try:
        assert core.max_model_len == 64
        core.submit(AddRequest("long", list(range(1, 80)), SamplingParams(max_tokens=2)))
        core.submit(AddRequest("edge", list(range(1, 65)), SamplingParams(max_tokens=1)))
        core.submit(AddRequest("ok", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True)))
        _wait(core, outs, ["long", "edge", "ok"])
        for rid in ("long", "edge"):
            (out,) = _finished(outs, rid)
            assert out.finish_reason == "abort" and out.error_type == "invalid_input"
            assert out.error_param == "prompt" and "at most 63" in out.error
        assert sum(len(o.new_token_ids) for o in outs if o.request_id == "ok") == 5
        assert _finished(outs, "ok")[0].error is None
    finally:
        core.shutdown()


def test_kv_pool_smaller_than_max_model_len_lowers_it_or_refuses(ckpts, make_llm, caplog):
    with caplog.at_level(logging.WARNING, logger="tidal.engine"):
        llm = make_llm(ckpts[0], num_kv_blocks=16)
    assert llm.engine.core.max_model_len == 64 and "max_model_len lowered" in caplog.text
    with pytest.raises(ValueError, match=r"max_model_len=200 .*at most 64 tokens"):
        make_llm(ckpts[0], num_kv_blocks=16, max_model_len=200)


def test_request_longer_than_a_small_pool_is_refused_not_hung(ckpts, make_llm):
    # Before: the model's 512-token context let a request grow past the 64-token pool, where it
    # was preempted and could never be re-admitted (and held every request behind it).
    llm = make_llm(ckpts[0], num_kv_blocks=16)
    result: dict = {}

    def go():
        try:
            result["out"] = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=100, ignore_eos=True),
                                         use_tqdm=False)
        except Exception as e:
            result["err"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "generate hung on a request the pool cannot hold"
    assert isinstance(result.get("err"), ValueError) and "max_model_len=64" in str(result["err"])


def test_preempted_requests_in_a_small_pool_all_come_back(ckpts, make_llm):
    llm = make_llm(ckpts[0], num_kv_blocks=16)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    alone = llm.generate([[9, 9, 9]], params, use_tqdm=False)[0].outputs[0].token_ids
    outs = llm.generate([[9, 9, 9]] * 3, params, use_tqdm=False)
    assert llm.state()["num_preemptions"] > 0
    assert [o.outputs[0].token_ids for o in outs] == [alone] * 3


# -- item 4: state() polls do not nest ---------------------------------------------------------
def test_state_polls_stay_bounded_and_keep_the_last_real_op(ckpts, make_llm):
    llm = make_llm(ckpts[0])
    llm.pause("keep")
    llm.resume()
    first = json.dumps(llm.state(), default=str)
    for _ in range(600):
        st = llm.state()
    last = json.dumps(st, default=str)
    assert len(last) < len(first) + 200, (len(first), len(last))
    assert st["last_control_op"]["op"] == "resume"
    assert st["control_ops"]["state"] == 600  # counted after its own reply was built


# -- items 9, 14: bad checkpoints are bad input, errors never list directories -----------------
def test_update_from_a_directory_without_weights_names_what_was_expected(ckpts, make_llm, tmp_path):
    llm = make_llm(ckpts[0])
    (tmp_path / "secret-notes.txt").write_text("TOPSECRET")
    (tmp_path / "id_rsa").write_text("KEY")
    with pytest.raises(EngineInvalidInput, match=r"no \*\.safetensors files in") as e:
        llm.update_weights(path=str(tmp_path), version=2)
    assert e.value.field == "path"
    assert "secret-notes" not in str(e.value) and "id_rsa" not in str(e.value)


def _bad_checkpoint(b: str, dst, how: str) -> dict:
    path = str(shutil.copytree(b, dst))
    st = weights_file(path)
    if how == "truncated":
        data = open(st, "rb").read()
        open(st, "wb").write(data[: len(data) // 2])
    elif how == "not_safetensors":
        open(st, "w").write("hello\n" * 10)
    elif how == "index_not_json":
        open(os.path.join(path, INDEX_FILE), "w").write("{not json")
    elif how == "index_empty_map":
        open(os.path.join(path, INDEX_FILE), "w").write('{"weight_map": {}}')
    elif how == "no_weights":
        os.remove(st)
    else:
        tensors = load_file(st)
        name = next(n for n in tensors if "layers.1.mlp.down_proj" in n)
        if how == "missing":
            del tensors[name]
        elif how == "wrong_shape":
            tensors[name] = torch.zeros(3, 3)
        elif how == "unknown_name":
            tensors["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
        save_file(tensors, st, metadata={"format": "pt"})
    return {"path": path}


@pytest.mark.parametrize("how", ["wrong_shape", "missing", "unknown_name", "truncated", "not_safetensors",
                                 "index_not_json", "index_empty_map", "no_weights", "bad_checksum",
                                 "checksum_for_absent_tensor", "named_tensor_wrong_shape"])
def test_bad_checkpoints_raise_invalid_input_and_change_nothing(ckpts, make_llm, tmp_path, how):
    a, b = ckpts
    llm = make_llm(a)
    on_a = tokens(llm)
    if how == "bad_checksum":
        name, _ = next(iter(iter_checkpoint(b)))
        kwargs, field = {"path": b, "checksums": {name: "0" * 64}}, "checksums"
    elif how == "checksum_for_absent_tensor":
        kwargs, field = {"path": b, "checksums": {"nope.weight": "0" * 64}}, "checksums"
    elif how == "named_tensor_wrong_shape":
        kwargs, field = {"named_tensors": {"model.norm.weight": torch.zeros(3)}}, "named_tensors"
    else:
        kwargs, field = _bad_checkpoint(b, tmp_path / how, how), "path"
    with pytest.raises(EngineInvalidInput) as e:
        llm.update_weights(version=7, **kwargs)
    assert e.value.field == field
    st = llm.state()
    assert st["weight_version"] == 0 and st["state"] == "serving"
    assert tokens(llm) == on_a


def test_right_checksum_still_accepted(ckpts, make_llm):
    llm = make_llm(ckpts[0])
    name, t = next(iter(iter_checkpoint(ckpts[1])))
    assert llm.update_weights(path=ckpts[1], version=2, checksums={name: tensor_sha256(t)})["weight_version"] == 2


# -- item 10: the engine enforces weights_root --------------------------------------------------
def test_engine_refuses_update_paths_escaping_weights_root(ckpts, make_llm, tmp_path):
    a, b = ckpts
    root = tmp_path / "root"
    root.mkdir()
    outside = str(shutil.copytree(b, tmp_path / "outside"))
    inside = str(shutil.copytree(b, root / "inside"))
    escape = root / "escape"
    escape.mkdir()
    shutil.copy(os.path.join(b, "config.json"), escape)
    with open(escape / INDEX_FILE, "w") as f:
        json.dump({"weight_map": {"x": "../../outside/model.safetensors"}}, f)
    link = root / "link"
    link.mkdir()
    os.symlink(weights_file(outside), link / "model.safetensors")
    llm = make_llm(a, weights_root=str(root))
    on_a = tokens(llm)
    for path in (str(escape), str(link), outside, str(root / ".." / "outside")):
        with pytest.raises(EngineInvalidInput, match="outside the weights root") as e:
            llm.update_weights(path=path, version=5)
        assert e.value.field == "path"
    assert llm.state()["weight_version"] == 0 and tokens(llm) == on_a
    assert llm.update_weights(path=inside, version=5)["weight_version"] == 5
