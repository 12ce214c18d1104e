"""The CPU swap commit (tidal/engine/weight_swap.py): a commit points each parameter at a buffer
the worker staged, the storage it replaces is the next update's buffer, and the result is what a
copy commit gives: HF's greedy output on the new weights, untouched rows intact, tied weights tied."""
from __future__ import annotations

import torch
from torch import nn

from tests.engine.test_update_weights import PROMPTS, hf_greedy, tokens
from tidal.engine.weight_swap import swappable
from tidal.models.loader import iter_checkpoint


def ptrs(model) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in model.named_parameters()}


def test_swap_commits_match_hf_and_ping_pong_between_two_storages(tiny_ckpt, make_llm):
    a, b = tiny_ckpt("qwen2", seed=0), tiny_ckpt("qwen2", seed=1)
    llm = make_llm(a)
    model = llm.engine.core.runner.model
    on_a, first = tokens(llm), ptrs(model)
    res = llm.update_weights(path=b, version=2)
    assert res["committed"] and res["staging"] == "copy"
    second = ptrs(model)
    assert all(second[n] != first[n] for n in first)  # every parameter was swapped, none copied into
    assert tokens(llm) == hf_greedy(b)
    llm.update_weights(named_tensors=dict(iter_checkpoint(a)), version=3)
    assert ptrs(model) == first  # the storage the first commit replaced staged the second
    assert tokens(llm) == on_a
    llm.update_weights(path=b, version=4)
    assert ptrs(model) == second
    assert tokens(llm) == hf_greedy(b)
    assert llm.generate(PROMPTS[:1], use_tqdm=False)[0].outputs[0].weight_version == 4


def test_cached_fp32_head_follows_two_swaps_without_a_step_between(tiny_ckpt, make_llm):
    # bf16 weights with an fp32 LM head: Linear keeps an fp32 copy of the head keyed by the
    # weight's address and version. Two swaps bring the first address back; the copy must not
    # survive them.
    ckpts = [tiny_ckpt("qwen2", seed=s) for s in (0, 1, 2)]
    kw = dict(dtype="bfloat16", lm_head_dtype="float32")
    want = tokens(make_llm(ckpts[2], **kw))
    llm = make_llm(ckpts[0], **kw)
    on_0 = tokens(llm)
    assert on_0 != want
    llm.update_weights(path=ckpts[1], version=2)
    llm.update_weights(path=ckpts[2], version=3)
    assert tokens(llm) == want


def test_subset_updates_keep_the_rows_they_do_not_name(tiny_ckpt, make_llm):
    a, b = tiny_ckpt("qwen2", seed=0), tiny_ckpt("qwen2", seed=1)
    llm = make_llm(a)
    model = llm.engine.core.runner.model
    arch = model.arch
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    qkv_name = "model.layers.0.self_attn.qkv_proj.weight"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    at = ptrs(model)
    b_tensors = dict(iter_checkpoint(b))
    k_name, q_name = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    llm.update_weights(named_tensors={k_name: b_tensors[k_name]}, version=2)
    params = dict(model.named_parameters())
    qkv = params[qkv_name]
    assert torch.equal(qkv[q:q + kv], b_tensors[k_name])
    assert torch.equal(qkv[:q], before[qkv_name][:q]) and torch.equal(qkv[q + kv:], before[qkv_name][q + kv:])
    assert {n for n in at if ptrs(model)[n] != at[n]} == {qkv_name}  # only the touched parameter moved
    # The second subset stages into the storage the first replaced, which still holds A's k rows:
    # they must come from the live (B) values.
    llm.update_weights(named_tensors={q_name: b_tensors[q_name].to(torch.bfloat16)}, version=3)
    qkv = dict(model.named_parameters())[qkv_name]
    assert qkv.data_ptr() == at[qkv_name]
    assert torch.equal(qkv[:q], b_tensors[q_name].to(torch.bfloat16).float())  # cast while staging
    assert torch.equal(qkv[q:q + kv], b_tensors[k_name])
    assert torch.equal(qkv[q + kv:], before[qkv_name][q + kv:])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {qkv_name}


def test_tied_embeddings_stay_one_parameter(tiny_ckpt, make_llm):
    a, b = tiny_ckpt("qwen3", seed=0), tiny_ckpt("qwen3", seed=1)
    want = tokens(make_llm(b))
    llm = make_llm(a)
    model = llm.engine.core.runner.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for version, ckpt in ((2, b), (3, a), (4, b)):
        llm.update_weights(named_tensors=dict(iter_checkpoint(ckpt)), version=version)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokens(llm) == want


def test_abort_and_commit_of_a_held_swap(tiny_ckpt, make_llm):
    a, b = tiny_ckpt("qwen2", seed=0), tiny_ckpt("qwen2", seed=1)
    llm = make_llm(a)
    model = llm.engine.core.runner.model
    on_a, at = tokens(llm), ptrs(model)
    res = llm.update_weights(path=b, version=2, commit=False)
    assert res["staged"] and res["num_tensors"] > 0
    assert tokens(llm) == on_a and ptrs(model) == at  # staged, not live
    assert llm.abort_staged()["aborted"]
    assert tokens(llm) == on_a and ptrs(model) == at
    llm.update_weights(path=b, version=2, commit=False)
    assert llm.commit_weights(2)["weight_version"] == 2
    assert tokens(llm) == hf_greedy(b)


def test_only_parameters_owning_their_storage_are_swapped():
    m = nn.Module()
    m.own = nn.Parameter(torch.zeros(4, 3), requires_grad=False)
    base = torch.zeros(8, 3)
    m.view = nn.Parameter(base[2:6], requires_grad=False)  # a view into a larger storage
    shared = torch.zeros(2, 3)
    m.x, m.y = nn.Parameter(shared, requires_grad=False), nn.Parameter(shared, requires_grad=False)
    m.strided = nn.Parameter(torch.zeros(3, 4).t(), requires_grad=False)
    m.tied = m.own  # the same object under two names stays swappable
    assert swappable(m) == {m.own}


def test_a_weight_update_turns_cpu_prepacking_off(tiny_ckpt, make_llm):
    """Repacking large weights after every RL step costs more than it saves: from the first update
    on, the linears run F.linear (and hold no packed copy); outputs are the new weights'."""
    from tidal.models.layers import Linear

    arch = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=4)
    a, b = tiny_ckpt("llama", seed=0, **arch), tiny_ckpt("llama", seed=1, **arch)
    want = tokens(make_llm(b))
    llm = make_llm(a)
    linears = [m for m in llm.engine.core.runner.model.modules() if isinstance(m, Linear)]
    tokens(llm)
    assert any(m._packed is not None for m in linears)  # fixed weights: packed products
    llm.update_weights(path=b, version=2)
    assert tokens(llm) == want
    assert all(not m.cpu_prepack and m._packed is None for m in linears)
