"""staging="in_place" (DESIGN.md §8: when no second copy of the weights fits): each tensor is
written straight into the live parameters after a host copy of the region is kept; generation
is held meanwhile; any failure, or abort_staged, puts the old weights back bit for bit."""
from __future__ import annotations

import threading

import pytest
import torch

from tidal.engine.messages import EngineError, EngineInvalidInput
from tidal.engine.weights import tensor_sha256
from tidal.models.loader import iter_checkpoint
from tests.engine.test_weight_transfer import _catch, ckpts, join, specs_of, tokens  # noqa: F401


def params(llm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in llm.engine.core.runner.model.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_in_place_from_disk_and_from_a_trainer(ckpts, make_llm):
    a, b = ckpts
    on_b = tokens(make_llm(b))
    llm = make_llm(a)
    on_a = tokens(llm)
    res = llm.update_weights(path=b, staging="in_place", version=5)
    assert res["committed"] and res["staging"] == "in_place" and res["weight_version"] == 5
    assert tokens(llm) == on_b
    proc = join(llm, ckpt=a)      # and back to A from a trainer process, per tensor over gloo
    res = llm.update_weights(source="distributed", group_name="g", tensors=specs_of(iter_checkpoint(a)),
                             staging="in_place", timeout_s=60)
    assert proc.wait(60) == 0 and res["staging"] == "in_place"
    assert tokens(llm) == on_a
    assert llm.state()["weight_transfer"]["writing_in_place"] is False


def test_a_failure_part_way_restores_the_old_weights_exactly(ckpts, make_llm):
    a, b = ckpts
    llm = make_llm(a)
    on_a, before = tokens(llm), params(llm)
    b_tensors = list(iter_checkpoint(b))

    def broken():   # several of B's tensors land in place, then a tensor of the wrong shape
        yield from b_tensors[:6]
        yield b_tensors[6][0], torch.zeros(3, 3)
    with pytest.raises(EngineInvalidInput, match="shape"):
        llm.update_weights(named_tensors=broken(), staging="in_place")
    assert same(params(llm), before) and tokens(llm) == on_a
    # a wrong checksum on the last tensor from a trainer: all the others were written first
    last = b_tensors[-1][0]
    proc = join(llm, ckpt=b)
    with pytest.raises(EngineError, match="checksum"):
        llm.update_weights(source="distributed", group_name="g", tensors=specs_of(b_tensors), staging="in_place",
                           checksums={last: "0" * 64}, timeout_s=60)
    assert proc.wait(60) == 0
    st = llm.state()
    assert st["weight_version"] == 0 and st["weight_transfer"]["fenced"] is None
    assert st["weight_transfer"]["writing_in_place"] is False
    assert same(params(llm), before) and tokens(llm) == on_a


def test_generation_is_held_while_the_parameters_are_written(ckpts, make_llm):
    a, b = ckpts
    on_b = tokens(make_llm(b))
    llm = make_llm(a)
    gate = threading.Event()

    def slow_b():
        for i, item in enumerate(iter_checkpoint(b)):
            if i == 2:
                assert gate.wait(60)
            yield item
    errors: list[BaseException] = []
    upd = threading.Thread(target=lambda: _catch(errors, lambda: llm.update_weights(
        named_tensors=slow_b(), staging="in_place", version=1, timeout_s=120)))
    upd.start()
    for _ in range(200):   # bounded: the worker owns the parameters within a few loop turns
        if llm.state()["weight_transfer"]["writing_in_place"]:
            break
    assert llm.state()["weight_transfer"]["writing_in_place"]
    out: list = []
    gen = threading.Thread(target=lambda: out.append(tokens(llm)))
    gen.start()
    s0 = llm.state()["step_count"]
    for _ in range(5):     # each state() is a full turn of the core loop: a runnable step would have run
        st = llm.state()
    assert st["step_count"] == s0 and st["num_waiting"] + st["num_running"] > 0
    with pytest.raises(EngineError, match="in-place"):
        llm.pause("keep")
        try:
            llm.sleep(["weights"])
        finally:
            llm.resume()
    gate.set()
    upd.join(60)
    gen.join(60)
    assert not errors and out == [on_b]   # every token came after the commit: B's greedy output


def test_staged_in_place_commits_or_aborts(ckpts, make_llm):
    a, b = ckpts
    on_b = tokens(make_llm(b))
    llm = make_llm(a)
    on_a, before = tokens(llm), params(llm)
    res = llm.update_weights(path=b, staging="in_place", commit=False, version=7)
    assert res["staged"] and res["staging"] == "in_place" and res["staged_version"] == 7
    st = llm.state()["weight_transfer"]
    assert st["writing_in_place"] and st["staged_version"] == 7
    assert llm.abort_staged()["aborted"]
    assert same(params(llm), before) and tokens(llm) == on_a
    llm.update_weights(path=b, staging="in_place", commit=False, version=7)
    assert llm.commit_weights(7)["weight_version"] == 7
    assert tokens(llm) == on_b and llm.state()["weight_version"] == 7


def test_checksums_are_checked_before_each_write(ckpts, make_llm):
    a, b = ckpts
    llm = make_llm(a)
    first = next(iter(iter_checkpoint(b)))
    llm.update_weights(named_tensors=[first], staging="in_place", checksums={first[0]: tensor_sha256(first[1])})
    with pytest.raises(EngineInvalidInput, match="checksum"):
        llm.update_weights(named_tensors=[first], staging="in_place", checksums={first[0]: "f" * 64})
