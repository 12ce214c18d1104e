"""Linear layers on the CPU through oneDNN with prepacked weights (EngineConfig.cpu_prepack_weights):
the same products as F.linear, and the packed copy follows every way a weight can change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tidal import LLM, SamplingParams
from tidal.models.layers import Linear, drop_derived_weights, invariant_linear, set_cpu_prepack


def _linear(in_f: int = 1024, out_f: int = 1024, bias: bool = True) -> Linear:
    lin = Linear(in_f, out_f, bias, torch.float32)
    with torch.no_grad():
        lin.weight.normal_(std=in_f**-0.5)  # outputs of order 1
        if bias:
            lin.bias.normal_()
    lin.cpu_prepack = True
    return lin


@pytest.mark.parametrize("shape", [(1, 1024), (2, 1024), (8, 1024), (65, 1024), (3, 5, 1024)])
def test_prepacked_products_equal_f_linear(shape):
    lin = _linear()  # 1M elements: from PREPACK_MIN_ROWS rows
    x = torch.randn(*shape)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
    rows = x.numel() // x.shape[-1]
    assert (lin._packed is not None) is (rows >= Linear.PREPACK_MIN_ROWS)


@pytest.mark.parametrize("rows,in_f,out_f,packed", [
    (64, 256, 256, False),  # below PREPACK_MIN_WEIGHT (a 256 x 256 o_proj): F.linear
    (64, 256, 512, True), (64, 256, 1536, True),
    (1, 256, 256, False), (1, 256, 1536, True),  # one row: oneDNN below PREPACK_ONE_ROW_MAX_WEIGHT only
    (1, 1024, 1024, False),
])
def test_which_weights_and_rows_are_packed(rows, in_f, out_f, packed):
    lin = _linear(in_f, out_f)
    x = torch.randn(rows, in_f)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
    assert (lin._packed is not None) is packed


def test_the_packed_copy_follows_in_place_writes_and_replaced_storage():
    lin = _linear(bias=False)
    x = torch.randn(16, 1024)
    lin(x)
    with torch.no_grad():
        lin.weight.copy_(torch.randn_like(lin.weight) * 0.03)  # an update_weights commit
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight), atol=1e-4, rtol=1e-4)
    lin.weight.data = torch.randn(1024, 1024) * 0.03  # wake from sleep, or storage swapped in
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight), atol=1e-4, rtol=1e-4)
    drop_derived_weights(lin)
    assert lin._packed is None


def test_batch_invariant_mode_keeps_its_padded_f_linear():
    lin = _linear()
    lin.batch_invariant = True
    x = torch.randn(20, 1024)
    assert torch.equal(lin(x), invariant_linear(x, lin.weight, lin.bias, Linear.ROW_TILE))
    assert lin._packed is None


def test_switching_off_frees_the_copies():
    lin = _linear()
    lin(torch.randn(16, 1024))
    set_cpu_prepack(lin, False)
    assert lin._packed is None and lin.cpu_prepack is False


def test_engine_outputs_agree_with_and_without_prepacking(tiny_ckpt):
    """Greedy tokens through the whole engine, prepacked (the CPU default) and plain F.linear, on a
    checkpoint whose MLP weights are large enough to be prepacked."""
    path = tiny_ckpt(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=4)
    prompts = [[5, 9, 2, 7, 11, 3, 8, 1, 4], [1, 2, 3], list(range(40, 60))]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = {}
    for on in (True, False):
        llm = LLM(path, device="cpu", dtype="float32", cpu_prepack_weights=on)
        try:
            linears = [m for m in llm.engine.core.runner.model.modules() if isinstance(m, Linear)]
            assert linears and all(m.cpu_prepack is on for m in linears)
            outs[on] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            assert any(m._packed is not None for m in linears) is on  # the prefill step has >= 8 rows
        finally:
            llm.shutdown()
    assert outs[True] == outs[False]
