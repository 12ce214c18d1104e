"""Loading checkpoints: formats, weight specs, weight updates and the errors users see."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tidal.engine.messages import EngineInvalidInput
from tidal.models import get_model_class, iter_checkpoint, load_arch, load_model
from tidal.models.loader import weight_files
from tests.helpers import PagedRunner
from tidal.models.tiny import EOS_ID, IM_END_ID

PROMPT = [3, 14, 15, 92, 65, 35]


def copy_ckpt(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def edit_config(path: str, **changes) -> None:
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def logits_of(model, tokens=PROMPT) -> torch.Tensor:
    return PagedRunner(model, 1, 32).step([tokens])[0]


# ---- what loads -------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_arch_fields(tiny_ckpt, arch):
    model = load_model(tiny_ckpt(arch), torch.float32, "cpu")
    a = model.arch
    assert a.architecture == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                              "qwen3": "Qwen3ForCausalLM"}[arch]
    assert (a.num_layers, a.num_heads, a.num_kv_heads, a.hidden_size) == (2, 4, 2, 64)
    assert a.head_dim == (32 if arch == "qwen3" else 16)
    assert a.max_model_len == 512 and a.vocab_size == 272
    assert a.eos_token_ids == [EOS_ID, IM_END_ID]       # generation_config first, then config.json
    assert a.tie_word_embeddings == (arch == "qwen3")
    assert load_arch(tiny_ckpt(arch)) == a


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_weight_specs_cover_the_checkpoint(tiny_ckpt, arch):
    path = tiny_ckpt(arch)
    model = load_model(path, torch.bfloat16, "cpu", load_format="dummy")
    specs = model.weight_specs()
    ckpt = dict(iter_checkpoint(path))
    assert set(ckpt) == set(specs) - model.optional_weights()
    for name, tensor in ckpt.items():
        assert specs[name] == (tuple(tensor.shape), torch.bfloat16)
        model.check_weight(name, tensor)
    if arch == "qwen2":
        assert "model.layers.1.self_attn.k_proj.bias" in specs
        assert "model.layers.1.self_attn.o_proj.bias" not in specs
    if arch == "qwen3":
        assert specs["model.layers.0.self_attn.q_norm.weight"][0] == (32,)
        assert "lm_head.weight" in specs and model.optional_weights() == {"lm_head.weight"}


def test_sharded_checkpoint_loads_the_same_weights(tiny_ckpt):
    single = load_model(tiny_ckpt("qwen2"), torch.float32, "cpu")
    sharded_path = tiny_ckpt("qwen2", num_shards=3)
    assert len([f for f in os.listdir(sharded_path) if f.endswith(".safetensors")]) == 3
    sharded = load_model(sharded_path, torch.float32, "cpu")
    for (n1, p1), (n2, p2) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_dummy_load_needs_only_config_and_is_seeded(tiny_ckpt, tmp_path):
    path = str(tmp_path)
    shutil.copy(os.path.join(tiny_ckpt("llama"), "config.json"), path)
    a = load_model(path, torch.float32, "cpu", load_format="dummy", seed=1)
    b = load_model(path, torch.float32, "cpu", load_format="dummy", seed=1)
    c = load_model(path, torch.float32, "cpu", load_format="dummy", seed=2)
    la, lb, lc = logits_of(a), logits_of(b), logits_of(c)
    assert torch.equal(la, lb) and not torch.equal(la, lc)
    assert torch.isfinite(la).all()


def test_load_weights_updates_in_place_with_cast(tiny_ckpt):
    """The weight-update path: new tensors (other dtype) replace the old ones in the same storage."""
    model = load_model(tiny_ckpt("qwen3"), torch.float32, "cpu")
    target = load_model(tiny_ckpt("qwen3", seed=5), torch.float32, "cpu")
    storage = model.model.layers[0].self_attn.qkv_proj.weight.data_ptr()
    new = [(n, t.to(torch.bfloat16)) for n, t in iter_checkpoint(tiny_ckpt("qwen3", seed=5))]
    loaded = model.load_weights(new)
    assert loaded == {n for n, _ in new}
    assert model.model.layers[0].self_attn.qkv_proj.weight.data_ptr() == storage
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
    torch.testing.assert_close(logits_of(model), logits_of(target), atol=0.05, rtol=0)


def test_old_style_rope_scaling_config_matches_rope_parameters(tiny_ckpt, tmp_path):
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    new_style = tiny_ckpt("llama", rope_parameters=dict(params))
    old_style = copy_ckpt(new_style, tmp_path / "old")
    scaling = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
    edit_config(old_style, rope_parameters=None, rope_theta=500000.0, rope_scaling={"type": "llama3", **scaling})
    a, b = load_model(new_style, torch.float32, "cpu"), load_model(old_style, torch.float32, "cpu")
    assert a.arch.rope == b.arch.rope and b.arch.rope.theta == 500000.0
    assert torch.equal(logits_of(a), logits_of(b))


def test_head_dim_defaults_to_hidden_over_heads(tiny_ckpt, tmp_path):
    path = copy_ckpt(tiny_ckpt("llama"), tmp_path / "m")
    edit_config(path, head_dim=None, max_position_embeddings=None)   # older Llama configs
    arch = load_model(path, torch.float32, "cpu").arch
    assert arch.head_dim == 16 and arch.max_model_len == 2048


def test_get_model_class_accepts_transformers_config(tiny_ckpt):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_ckpt("qwen3"))
    cls = get_model_class(cfg)
    assert cls.__name__ == "Qwen3ForCausalLM"
    assert cls.arch_from_config(cfg).head_dim == 32


# ---- errors: raised before anything is built, naming the field or tensor ----------------

def test_unknown_architecture(tiny_ckpt, tmp_path):
    path = copy_ckpt(tiny_ckpt("llama"), tmp_path / "m")
    edit_config(path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        load_model(path, torch.float32, "cpu")
    edit_config(path, architectures=None)
    with pytest.raises(ValueError, match="architectures"):
        load_model(path, torch.float32, "cpu")


def test_missing_directory_config_or_weights(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "nope"), torch.float32, "cpu")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path), torch.float32, "cpu")
    shutil.copy(os.path.join(tiny_ckpt("llama"), "config.json"), tmp_path)
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        load_model(str(tmp_path), torch.float32, "cpu")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_shape_mismatch_names_tensor_and_shapes(tiny_ckpt, tmp_path):
    path = copy_ckpt(tiny_ckpt("llama"), tmp_path / "m")
    edit_config(path, intermediate_size=96)
    with pytest.raises(ValueError, match=r"'model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight' has shape "
                                         r"\[\d+, \d+\], expected \[\d+, \d+\]"):
        load_model(path, torch.float32, "cpu")


def test_missing_and_unknown_tensors(tiny_ckpt, tmp_path):
    path = copy_ckpt(tiny_ckpt("llama"), tmp_path / "m")
    st = os.path.join(path, "model.safetensors")
    tensors = load_file(st)
    dropped = ["model.layers.1.self_attn.v_proj.weight", "model.norm.weight"]
    save_file({n: t for n, t in tensors.items() if n not in dropped}, st)
    with pytest.raises(ValueError, match=r"missing 2 tensor\(s\).*model\.layers\.1\.self_attn\.v_proj\.weight"
                                         r".*model\.norm\.weight"):
        load_model(path, torch.float32, "cpu")
    save_file({**tensors, "model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}, st)
    with pytest.raises(ValueError, match=r"'model\.layers\.9\.mlp\.up_proj\.weight'.*not a weight"):
        load_model(path, torch.float32, "cpu")
    # Buffers that old exports saved are skipped, not errors.
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, st)
    load_model(path, torch.float32, "cpu")


def test_sharded_index_naming_absent_shard(tiny_ckpt, tmp_path):
    path = copy_ckpt(tiny_ckpt("qwen2", num_shards=3), tmp_path / "m")
    os.remove(os.path.join(path, "model-00002-of-00003.safetensors"))
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors"):
        load_model(path, torch.float32, "cpu")


def test_check_weight_errors(tiny_ckpt):
    model = load_model(tiny_ckpt("qwen2"), torch.float32, "cpu", load_format="dummy")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.bias' has shape \[3\], expected \[64\]"):
        model.check_weight("model.layers.0.self_attn.q_proj.bias", torch.zeros(3))
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.weight' has dtype torch\.int64"):
        model.check_weight("model.embed_tokens.weight", torch.zeros(272, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.qkv_proj\.weight'.*not a weight"):
        model.check_weight("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(128, 64))
    before = model.model.norm.weight.clone()
    with pytest.raises(ValueError, match="lm_head"):
        model.load_weights([("model.norm.weight", torch.zeros(64)), ("lm_head.weight", torch.zeros(1))])
    assert not torch.equal(model.model.norm.weight, before)   # per-tensor checks: earlier tensors landed


@pytest.mark.parametrize("field,value,match", [
    ("hidden_size", None, "missing required field 'hidden_size'"),
    ("num_key_value_heads", 3, "num_attention_heads = 4 is not a multiple of num_key_value_heads = 3"),
    ("hidden_act", "gelu", "hidden_act = 'gelu'"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "rope_type 'longrope' is not supported"),
    ("rope_parameters", {"rope_type": "llama3", "factor": 8.0}, "'low_freq_factor'"),
    ("vocab_size", 0, "'vocab_size' = 0"),
])
def test_bad_config_fields(tiny_ckpt, tmp_path, field, value, match):
    path = copy_ckpt(tiny_ckpt("llama"), tmp_path / "m")
    edit_config(path, **{field: value})
    with pytest.raises(ValueError, match=match):
        load_model(path, torch.float32, "cpu")


def test_qwen2_sliding_window_rejected(tiny_ckpt, tmp_path):
    path = copy_ckpt(tiny_ckpt("qwen2"), tmp_path / "m")
    edit_config(path, use_sliding_window=True)
    with pytest.raises(ValueError, match="use_sliding_window"):
        load_model(path, torch.float32, "cpu")


def test_bad_load_format_and_dtype(tiny_ckpt):
    with pytest.raises(ValueError, match="load_format = 'pt'"):
        load_model(tiny_ckpt("llama"), torch.float32, "cpu", load_format="pt")
    with pytest.raises(ValueError, match="dtype = 'int8'"):
        load_model(tiny_ckpt("llama"), "int8", "cpu")


# ---- weights root: every file the loader opens stays inside it ----------------------------
def _index(path, weight_map: dict) -> None:
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)


def _error(call) -> EngineInvalidInput:
    with pytest.raises(EngineInvalidInput) as e:
        call()
    return e.value


def test_weight_files_confines_index_entries_and_symlinks_to_root(tiny_ckpt, tmp_path):
    src = tiny_ckpt("llama")
    root = tmp_path / "root"
    ckpt = copy_ckpt(src, root / "m")
    shutil.copy(os.path.join(src, "model.safetensors"), tmp_path / "outside.safetensors")
    assert weight_files(ckpt, root=str(root)) == [os.path.realpath(os.path.join(ckpt, "model.safetensors"))]
    # an index naming an existing and a missing file outside: one wording, no existence oracle
    errors = []
    for name in ("../../outside.safetensors", "../../absent.safetensors", "/etc/passwd"):
        _index(ckpt, {"w": name})
        err = _error(lambda: weight_files(ckpt, root=str(root)))
        assert err.field == "path"
        errors.append(str(err).replace(os.path.join(os.path.realpath(ckpt), name), "<X>").replace(name, "<X>"))
    assert errors[0] == errors[1] == errors[2] and "outside the weights root" in errors[0], errors
    os.remove(os.path.join(ckpt, "model.safetensors.index.json"))
    os.remove(os.path.join(ckpt, "model.safetensors"))
    os.symlink(tmp_path / "outside.safetensors", os.path.join(ckpt, "model.safetensors"))
    assert "outside the weights root" in str(_error(lambda: weight_files(ckpt, root=str(root))))
    assert "outside the weights root" in str(_error(lambda: list(iter_checkpoint(ckpt, root=str(root)))))
    assert weight_files(ckpt) == [str(tmp_path / "outside.safetensors")]  # no root: followed


def test_weight_files_refuses_a_fifo_without_opening_it(tiny_ckpt, tmp_path):
    import subprocess
    import sys
    ckpt = copy_ckpt(tiny_ckpt("llama"), tmp_path / "m")
    os.remove(os.path.join(ckpt, "model.safetensors"))
    os.mkfifo(os.path.join(ckpt, "model.safetensors"))
    # In a child process: opening a FIFO blocks in native code with the GIL held, so only a
    # process boundary can bound a regression here.
    code = ("import sys; from tidal.models.loader import iter_checkpoint\n"
            "try:\n    list(iter_checkpoint(sys.argv[1]))\nexcept ValueError as e:\n    print(e)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code, ckpt], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the loader opened a FIFO and blocked")
    assert "is not a regular file" in out.stdout, out.stdout + out.stderr


def test_no_weights_error_does_not_list_the_directory(tmp_path):
    (tmp_path / "private-key.pem").write_text("x")
    err = _error(lambda: weight_files(str(tmp_path)))
    assert "no *.safetensors files in" in str(err) and "private-key" not in str(err)
