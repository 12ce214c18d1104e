"""Paged KV cache bookkeeping: blocks, block tables, reference counts, prefix caching.

Invariants (checked by `check_invariants`, asserted in tests after every step):
  I1  every block is either free (ref_count == 0 and in `free_queue`) or in use
      (ref_count > 0 and not in `free_queue`);
  I2  a block's ref_count equals the number of live block tables that hold it
      (so no block is owned twice without being counted twice);
  I3  `hash_to_block[h].hash == h`; a free block that still has a hash is a cached block that a
      later request can revive; evicting it drops the hash;
  I4  when no request is live, every block is free (cached or not).
Only the core loop thread calls into this class; it has no locks on purpose.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import xxhash

from tidal.engine.request import PLACEHOLDER, Request


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full, computed and registered


def hash_block(parent_hash: int | None, token_ids: list[int]) -> int:
    """Chain hash: a block's identity is its tokens and everything before it."""
    h = xxhash.xxh3_64()
    h.update((parent_hash if parent_hash is not None else 0).to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, watermark: float = 0.01
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark_blocks = int(watermark * num_blocks)
        self.reset()

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def get_computed_blocks(self, req: Request) -> list[int]:
        """Leading full blocks of `req` already in the prefix cache. At least one token is
        always left to compute, so the last token's logits can be sampled. A request that still
        needs prompt logprobs gets none: its prompt is recomputed to score every token."""
        if not self.enable_prefix_caching:
            return []
        if req.needs_prompt_logprobs:
            self.prefix_queries += req.num_tokens
            return []
        hits: list[int] = []
        parent: int | None = None
        max_blocks = (req.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            tokens = req.token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = hash_block(parent, tokens)
            block_id = self.hash_to_block.get(parent)
            if block_id is None:
                break
            hits.append(block_id)
        self.prefix_queries += req.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    # -- allocation ----------------------------------------------------------------------
    def allocate_slots(
        self,
        req: Request,
        num_new_tokens: int,
        copies: list[tuple[int, int]],
        computed_blocks: Iterable[int] = (),
        admit: bool = False,
    ) -> bool:
        """Make `req.block_table` cover `num_computed_tokens + num_new_tokens` tokens.

        `computed_blocks` are prefix-cache hits for a request being admitted (its table is
        empty). A shared partial block about to be written is copied first (copy-on-write);
        the (src, dst) pairs are appended to `copies` for the runner. Returns False, changing
        nothing, when there are not enough free blocks."""
        table = req.block_table
        if not admit and not computed_blocks:  # fast path: the tokens fit the blocks it owns
            write_block = req.num_computed_tokens // self.block_size
            if req.num_computed_tokens + num_new_tokens <= len(table) * self.block_size and (
                write_block >= len(table) or self.blocks[table[write_block]].ref_count == 1
            ):
                return True
        computed_blocks = list(computed_blocks)
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        have = len(req.block_table) + len(computed_blocks)
        need_new = max(0, self.blocks_needed(num_computed + num_new_tokens) - have)
        write_block = num_computed // self.block_size
        cow = write_block < len(req.block_table) and self.blocks[req.block_table[write_block]].ref_count > 1
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        reserve = self.watermark_blocks if admit else 0
        if need_new + int(cow) + revived + reserve > self.num_free_blocks:
            return False
        for b in computed_blocks:
            self._take(b)
        req.block_table.extend(computed_blocks)
        req.num_computed_tokens = num_computed
        req.num_cached_blocks = max(req.num_cached_blocks, len(computed_blocks))
        if cow:
            old = req.block_table[write_block]
            new = self._pop_free()
            self.blocks[old].ref_count -= 1
            req.block_table[write_block] = new
            copies.append((old, new))
        for _ in range(need_new):
            req.block_table.append(self._pop_free())
        return True

    def fork(self, src: Request, dst: Request) -> None:
        """`dst` shares every block of `src` (the prompt of an n-sample group)."""
        assert not dst.block_table, "fork target must own no blocks"
        for b in src.block_table:
            self.blocks[b].ref_count += 1
        dst.block_table = list(src.block_table)
        dst.num_cached_blocks = src.num_cached_blocks

    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks that became full and computed in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(req.block_table))
        for i in range(req.num_cached_blocks, num_full):
            block = self.blocks[req.block_table[i]]
            if block.hash is None:
                parent = self.blocks[req.block_table[i - 1]].hash if i > 0 else None
                if i > 0 and parent is None:
                    break  # an unhashed ancestor (after a cache reset): chain broken, stop here
                tokens = req.token_ids[i * self.block_size : (i + 1) * self.block_size]
                assert PLACEHOLDER not in tokens, "a block with an unresolved token reached the prefix cache"
                h = hash_block(parent, tokens)
                if h not in self.hash_to_block:
                    block.hash = h
                    self.hash_to_block[h] = block.block_id
                else:
                    break  # same content computed twice concurrently: keep the first copy
            req.num_cached_blocks = i + 1

    def free(self, req: Request) -> None:
        """Drop `req`'s references. Tail blocks go to the free queue first so that, under
        eviction, a prompt's leading (most shareable) blocks survive longest."""
        for b in reversed(req.block_table):
            block = self.blocks[b]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {b} freed more times than it was taken"
            if block.ref_count == 0:
                self.free_queue[b] = None
        req.block_table = []
        req.num_cached_blocks = 0
        req.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (after a weight commit the cached KV is stale)."""
        for block in self.blocks:
            block.hash = None
        self.hash_to_block.clear()

    def reset(self) -> None:
        """Every block free and uncached (also used when the KV pool itself is released)."""
        self.blocks = [Block(i) for i in range(self.num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(self.num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_hits = 0  # tokens served from the prefix cache (metrics)
        self.prefix_queries = 0

    # -- internals -----------------------------------------------------------------------
    def _take(self, b: int) -> None:
        block = self.blocks[b]
        if block.ref_count == 0:
            del self.free_queue[b]
        block.ref_count += 1

    def _pop_free(self) -> int:
        b, _ = self.free_queue.popitem(last=False)
        block = self.blocks[b]
        if block.hash is not None:
            del self.hash_to_block[block.hash]
            block.hash = None
        block.ref_count = 1
        return b

    def check_invariants(self, live: Iterable[Request]) -> None:
        counts = [0] * self.num_blocks
        for req in live:
            assert len(set(req.block_table)) == len(req.block_table), (
                f"request {req.request_id}/{req.index} holds a block twice: {req.block_table}"
            )
            for b in req.block_table:
                counts[b] += 1
        for block in self.blocks:
            free = block.block_id in self.free_queue
            assert free == (block.ref_count == 0), f"I1 broken for block {block}"
            assert counts[block.block_id] == block.ref_count, (
                f"I2 broken for block {block}: held by {counts[block.block_id]} tables"
            )
            if block.hash is not None:
                assert self.hash_to_block.get(block.hash) == block.block_id, f"I3 broken for {block}"
        assert len(self.hash_to_block) == sum(b.hash is not None for b in self.blocks), "I3 broken"
