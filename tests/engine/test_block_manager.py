"""BlockManager on its own: allocation, prefix hits, copy-on-write, eviction, invariants."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.engine.kv_cache import BlockManager
from tidal.engine.request import Request
from tidal.sampling_params import SamplingParams


def _req(tokens: list[int], rid: str = "r") -> Request:
    return Request(rid, 0, list(tokens), SamplingParams(), seed=0)


def _compute(bm: BlockManager, req: Request, n: int, copies=None) -> None:
    assert bm.allocate_slots(req, n, copies if copies is not None else [])
    req.num_computed_tokens += n
    bm.cache_full_blocks(req)


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    bm = BlockManager(16, 4)
    a = _req(list(range(10)), "a")
    _compute(bm, a, 10)
    b = _req(list(range(8)) + [99, 98], "b")
    hits = bm.get_computed_blocks(b)
    assert hits == a.block_table[:2]
    assert bm.allocate_slots(b, 2, [], hits, admit=True)
    assert b.num_computed_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    # A prompt that is exactly the cached blocks still computes its last token.
    c = _req(list(range(8)), "c")
    assert len(bm.get_computed_blocks(c)) == 1
    bm.check_invariants([a, b])
    bm.free(a), bm.free(b)
    bm.check_invariants([])
    assert bm.num_free_blocks == 16


def test_fork_then_copy_on_write_of_partial_block():
    bm = BlockManager(16, 4)
    parent = _req(list(range(6)))
    _compute(bm, parent, 6)
    child = _req(list(range(6)), "child")
    bm.fork(parent, child)
    child.num_computed_tokens = 6
    assert all(bm.blocks[b].ref_count == 2 for b in parent.block_table)
    parent.token_ids.append(1)
    copies: list[tuple[int, int]] = []
    assert bm.allocate_slots(parent, 1, copies)
    assert copies and copies[0][0] == child.block_table[1] and copies[0][1] == parent.block_table[1]
    assert parent.block_table[0] == child.block_table[0]           # full block still shared
    child.token_ids.append(2)
    copies2: list[tuple[int, int]] = []
    assert bm.allocate_slots(child, 1, copies2)
    assert copies2 == []                                           # last owner writes in place
    bm.check_invariants([parent, child])


def test_allocation_failure_changes_nothing():
    bm = BlockManager(4, 4)
    a = _req(list(range(30)))
    assert not bm.allocate_slots(a, 30, [])
    assert a.block_table == [] and bm.num_free_blocks == 4
    bm.check_invariants([])


def test_eviction_drops_hash_and_reset_forgets_cache():
    bm = BlockManager(4, 4)
    a = _req(list(range(8)))
    _compute(bm, a, 8)
    bm.free(a)
    assert len(bm.hash_to_block) == 2
    b = _req(list(range(100, 116)), "b")
    assert bm.allocate_slots(b, 16, [])   # needs all 4 blocks: evicts the cached ones
    assert bm.hash_to_block == {}
    bm.check_invariants([b])
    bm.free(b)
    bm.reset_prefix_cache()
    assert all(blk.hash is None for blk in bm.blocks)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 3), st.booleans()), min_size=1, max_size=40))
def test_random_workload_keeps_invariants(ops):
    """Random admissions (with shared prefixes), decode steps and frees never break I1-I4."""
    bm = BlockManager(24, 4)
    live: list[Request] = []
    for i, (length, prefix_id, free_one) in enumerate(ops):
        if free_one and live:
            bm.free(live.pop(0))
        else:
            req = _req([prefix_id] * 8 + list(range(length)), f"r{i}")
            hits = bm.get_computed_blocks(req)
            if bm.allocate_slots(req, req.num_tokens - len(hits) * 4, [], hits, admit=True):
                req.num_computed_tokens = req.num_tokens
                bm.cache_full_blocks(req)
                live.append(req)
        for req in live:  # one decode step each, when it fits
            req.token_ids.append(5)
            if bm.allocate_slots(req, 1, []):
                req.num_computed_tokens += 1
                bm.cache_full_blocks(req)
            else:
                req.token_ids.pop()
        bm.check_invariants(live)
    for req in live:
        bm.free(req)
    bm.check_invariants([])
    assert bm.num_free_blocks == bm.num_blocks
