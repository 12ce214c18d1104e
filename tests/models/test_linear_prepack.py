"""Linear layers on the CPU through oneDNN with prepacked weights (EngineConfig.cpu_prepack_weights):
the same products as F.linear, and the packed copy follows every way a weight can change."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tidal import LLM, SamplingParams
from tidal.models.layers import Linear, drop_derived_weights, invariant_linear, set_cpu_prepack


def _linear(in_f: int = 64, out_f: int = 48, bias: bool = True) -> Linear:
    lin = Linear(in_f, out_f, bias, torch.float32)
    with torch.no_grad():
        lin.weight.normal_()
        if bias:
            lin.bias.normal_()
    lin.cpu_prepack = True
    return lin


@pytest.mark.parametrize("shape", [(1, 64), (8, 64), (65, 64), (3, 5, 64)])
def test_prepacked_products_equal_f_linear(shape):
    lin = _linear()
    x = torch.randn(*shape)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)
    rows = x.numel() // x.shape[-1]
    assert (lin._packed is not None) is (rows >= Linear.PREPACK_MIN_ROWS)


def test_the_packed_copy_follows_in_place_writes_and_replaced_storage():
    lin = _linear(bias=False)
    x = torch.randn(16, 64)
    lin(x)
    with torch.no_grad():
        lin.weight.copy_(torch.randn_like(lin.weight))  # an update_weights commit
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight), atol=1e-5, rtol=1e-5)
    lin.weight.data = torch.randn(48, 64)  # wake from sleep, or storage swapped in
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight), atol=1e-5, rtol=1e-5)
    drop_derived_weights(lin)
    assert lin._packed is None


def test_batch_invariant_mode_keeps_its_padded_f_linear():
    lin = _linear()
    lin.batch_invariant = True
    x = torch.randn(20, 64)
    assert torch.equal(lin(x), invariant_linear(x, lin.weight, lin.bias, Linear.ROW_TILE))
    assert lin._packed is None


def test_switching_off_frees_the_copies():
    lin = _linear()
    lin(torch.randn(16, 64))
    set_cpu_prepack(lin, False)
    assert lin._packed is None and lin.cpu_prepack is False


def test_engine_outputs_agree_with_and_without_prepacking(tiny_ckpt):
    """Greedy tokens through the whole engine, prepacked (the CPU default) and plain F.linear."""
    path = tiny_ckpt()
    prompts = [[5, 9, 2, 7, 11, 3, 8, 1, 4], [1, 2, 3], list(range(40, 60))]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = {}
    for on in (True, False):
        llm = LLM(path, device="cpu", dtype="float32", cpu_prepack_weights=on)
        try:
            linears = [m for m in llm.engine.core.runner.model.modules() if isinstance(m, Linear)]
            assert linears and all(m.cpu_prepack is on for m in linears)
            outs[on] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            if on:  # 3 prompts of 3-20 tokens prefill in one step of >= 8 rows: packed copies exist
                assert any(m._packed is not None for m in linears)
        finally:
            llm.shutdown()
    assert outs[True] == outs[False]
