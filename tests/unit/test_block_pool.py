"""The KV block pool and the per-request block tables over it: plain Python, no model, no torch."""

from __future__ import annotations

import pytest

import tokenmill.generation.kv_manager as kv_manager
from tokenmill.generation.block_pool import ROOT_HASH, BlockPool, chain_hash
from tokenmill.generation.kv_manager import KVCacheManager, cdiv
from tokenmill.generation.request import Request


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def make(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, list(tokens), len(tokens))


def compute(kv: KVCacheManager, req: Request) -> list[int]:
    """Admit ``req`` as the scheduler does (its cached prefix, then the rest in one chunk), mark
    every token computed and register its full blocks. Returns the ids of the cached blocks used."""
    cached = kv.find_cached_prefix(req)
    num_cached = len(cached) * kv.block_size
    assert kv.allocate_slots(req, req.num_tokens - num_cached, cached)
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req)
    return ids(cached)


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_blocks", [0, -3])
def test_pool_needs_at_least_one_block(num_blocks):
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(num_blocks)


@pytest.mark.parametrize("block_size", [0, -1])
def test_kv_manager_rejects_block_size_below_one(block_size):
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(8, block_size)


def test_kv_manager_rejects_an_empty_pool():
    with pytest.raises(ValueError, match="at least one block"):
        KVCacheManager(0, 16)


def test_cdiv():
    assert [cdiv(a, 4) for a in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


# -- the pool: allocation, reference counts, free ---------------------------------------------


def test_fresh_pool_is_all_free():
    pool = BlockPool(5)
    assert (pool.num_blocks, pool.num_free, pool.num_used, pool.num_cached) == (5, 5, 0, 0)
    assert pool.usage() == 0.0
    assert all(b.ref_cnt == 0 and b.block_hash is None for b in pool.blocks)


def test_allocate_hands_out_blocks_in_order_with_one_reference():
    pool = BlockPool(8)
    first = pool.allocate(3)
    assert ids(first) == [0, 1, 2]
    assert [b.ref_cnt for b in first] == [1, 1, 1]
    assert (pool.num_free, pool.num_used) == (5, 3)
    assert pool.usage() == 3 / 8
    assert ids(pool.allocate(2)) == [3, 4]
    assert (pool.num_free, pool.num_used) == (3, 5)
    assert pool.allocate(0) == []
    assert pool.num_free == 3


def test_allocating_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(RuntimeError, match="asked for 2 KV blocks with 1 free"):
        pool.allocate(2)
    assert (pool.num_free, pool.num_used) == (1, 3)
    assert ids(pool.allocate(1)) == [3]
    assert pool.usage() == 1.0


def test_free_returns_blocks_to_the_pool():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.free(blocks[2:])
    assert (pool.num_free, pool.num_used) == (2, 2)
    assert [b.ref_cnt for b in blocks] == [1, 1, 0, 0]
    pool.free(blocks[:2])
    assert (pool.num_free, pool.num_used) == (4, 0)


def test_free_twice_raises():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(RuntimeError, match="KV block 0 freed more often than taken"):
        pool.free([block])
    assert (block.ref_cnt, pool.num_free) == (0, 2)


def test_free_of_a_never_allocated_block_raises():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="KV block 1 freed more often than taken"):
        pool.free([pool.blocks[1]])


def test_touch_and_free_count_references():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.register(block, 7, (1, 2), None)
    pool.free([block])
    assert (block.ref_cnt, pool.num_free, pool.num_cached) == (0, 3, 1)
    pool.touch([block])  # found in the prefix cache by a first request: leaves the free queue
    assert (block.ref_cnt, pool.num_free, pool.num_used) == (1, 2, 1)
    pool.touch([block])  # and by a second one
    assert (block.ref_cnt, pool.num_free, pool.num_used) == (2, 2, 1)
    pool.free([block])
    assert (block.ref_cnt, pool.num_free, pool.num_used) == (1, 2, 1)
    pool.free([block])
    assert (block.ref_cnt, pool.num_free, pool.num_used) == (0, 3, 0)
    # Still cached while free, until it is handed out again.
    assert pool.lookup(7, (1, 2), None) is block


# -- the pool: eviction order ------------------------------------------------------------------


def test_freed_uncached_blocks_are_handed_out_before_fresh_ones():
    pool = BlockPool(5)
    blocks = pool.allocate(3)
    pool.free([blocks[1]])
    assert ids(pool.allocate(1)) == [1]
    assert ids(pool.allocate(2)) == [3, 4]


def test_cached_blocks_are_reused_least_recently_freed_first_and_after_uncached_ones():
    pool = BlockPool(6)
    b0, b1, b2, b3 = pool.allocate(4)
    pool.register(b0, 100, (1,), None)
    pool.register(b1, 101, (2,), b0)
    pool.register(b2, 102, (3,), None)
    # b3 holds nothing worth keeping.
    pool.free([b1])
    pool.free([b0])
    pool.free([b2])
    pool.free([b3])
    assert (pool.num_free, pool.num_cached) == (6, 3)
    # Uncached first (b3 jumps the queue, then the two never-used blocks), then cached by age.
    assert ids(pool.allocate(3)) == [3, 4, 5]
    assert pool.num_cached == 3
    assert ids(pool.allocate(1)) == [1]
    assert pool.lookup(101, (2,), b0) is None  # evicted when handed out
    assert pool.lookup(100, (1,), None) is b0
    assert pool.num_cached == 2
    assert ids(pool.allocate(1)) == [0]
    assert pool.lookup(100, (1,), None) is None
    assert pool.lookup(102, (3,), None) is b2
    assert ids(pool.allocate(1)) == [2]
    assert pool.num_cached == 0
    assert (pool.num_free, pool.num_used) == (0, 6)


def test_a_pool_preferring_warm_blocks_recycles_cached_ones_before_fresh_ones():
    """The CPU engine's order: uncached freed blocks, then cached ones by age, and only then
    blocks never handed out (their memory is not mapped yet)."""
    pool = BlockPool(6, prefer_warm=True)
    b0, b1, b2, b3 = pool.allocate(4)
    pool.register(b0, 100, (1,), None)
    pool.register(b2, 102, (3,), None)
    pool.free([b2])
    pool.free([b0])
    pool.free([b3])
    pool.free([b1])
    assert (pool.num_free, pool.num_used, pool.num_cached) == (6, 0, 2)
    assert ids(pool.allocate(2)) == [1, 3]  # uncached, most recently freed first
    assert ids(pool.allocate(1)) == [2]  # then the least recently freed cached block
    assert pool.lookup(102, (3,), None) is None and pool.lookup(100, (1,), None) is b0
    assert ids(pool.allocate(2)) == [0, 4]  # the last warm block, then fresh memory
    assert ids(pool.allocate(1)) == [5]
    assert (pool.num_free, pool.num_used, pool.num_cached) == (0, 6, 0)
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks with 0 free"):
        pool.allocate(1)


def test_the_cpu_engine_prefers_warm_blocks(llama_dir):
    from tokenmill import LLM

    assert not KVCacheManager(8, 4).pool.prefer_warm  # the pool's default keeps fresh blocks first
    assert LLM(llama_dir, device="cpu").engine.kv.pool.prefer_warm


def test_handing_out_a_block_clears_its_registration_and_bumps_its_generation():
    pool = BlockPool(1)
    (block,) = pool.allocate(1)
    generation = block.generation
    pool.register(block, 5, (9, 9), None)
    assert (block.block_hash, block.tokens, block.parent_id) == (5, (9, 9), None)
    pool.free([block])
    (again,) = pool.allocate(1)
    assert again is block
    assert (block.block_hash, block.tokens, block.parent_id) == (None, None, None)
    assert block.generation == generation + 1
    assert pool.num_cached == 0


def test_reset_cache_forgets_free_blocks_but_not_held_ones():
    pool = BlockPool(3)
    held, freed, _ = pool.allocate(3)
    pool.register(held, 1, (1,), None)
    pool.register(freed, 2, (2,), None)
    pool.free([freed])
    pool.reset_cache()
    assert pool.lookup(1, (1,), None) is held
    assert pool.lookup(2, (2,), None) is None
    assert (pool.num_cached, pool.num_free) == (1, 1)


# -- the pool: registration and lookup ---------------------------------------------------------


def test_register_first_block_with_a_hash_wins():
    pool = BlockPool(3)
    a, b, _ = pool.allocate(3)
    pool.register(a, 42, (1, 2), None)
    pool.register(b, 42, (1, 2), None)
    assert b.block_hash is None
    assert pool.lookup(42, (1, 2), None) is a
    assert pool.num_cached == 1
    # A registered block keeps its first registration.
    pool.register(a, 43, (3, 4), None)
    assert (a.block_hash, a.tokens) == (42, (1, 2))
    assert pool.lookup(43, (3, 4), None) is None


def test_register_is_a_no_op_without_caching():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.register(a, 42, (1, 2), None)
    assert a.block_hash is None
    assert pool.num_cached == 0
    assert pool.lookup(42, (1, 2), None) is None


def test_lookup_checks_tokens_and_parent():
    pool = BlockPool(4)
    p, x, other, _ = pool.allocate(4)
    pool.register(p, 1, (1, 2), None)
    pool.register(x, 2, (3, 4), p)
    pool.register(other, 3, (5, 6), None)
    assert pool.lookup(1, (1, 2), None) is p
    assert pool.lookup(2, (3, 4), p) is x
    assert pool.lookup(1, (1, 9), None) is None  # same hash, other tokens: a collision
    assert pool.lookup(2, (3, 4), other) is None  # right tokens under another parent
    assert pool.lookup(2, (3, 4), None) is None  # a child block is never a first block
    assert pool.lookup(1, (1, 2), other) is None  # a first block is never a child
    assert pool.lookup(99, (1, 2), None) is None


def test_a_child_cannot_be_found_through_its_parents_reused_block():
    pool = BlockPool(3)
    p, x = pool.allocate(2)
    pool.register(p, 1, (1, 2), None)
    pool.register(x, 2, (3, 4), p)
    pool.free([p])
    pool.free([x])
    assert ids(pool.allocate(1)) == [2]
    (reused,) = pool.allocate(1)
    assert reused is p
    # The reused block gets content registered under the very same hash and tokens.
    pool.register(p, 1, (1, 2), None)
    assert pool.lookup(1, (1, 2), None) is p
    # x is still registered, and names p's id as its parent, but not this generation of it.
    assert x.block_hash == 2 and x.parent_id == p.block_id
    assert pool.lookup(2, (3, 4), p) is None


# -- the manager: block tables ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "num_blocks"), [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (16, 4)]
)
def test_allocate_slots_takes_ceil_tokens_over_block_size(num_tokens, num_blocks):
    kv = KVCacheManager(8, 4)
    req = make("a", list(range(num_tokens)))
    assert kv.allocate_slots(req, num_tokens)
    assert kv.block_ids("a") == list(range(num_blocks))
    assert (kv.pool.num_used, kv.pool.num_free) == (num_blocks, 8 - num_blocks)


def test_a_table_grows_only_when_tokens_cross_a_block_boundary():
    kv = KVCacheManager(8, 4)
    req = make("a", [1, 2, 3])
    assert kv.allocate_slots(req, 3)
    req.num_computed_tokens = 3
    grown = []
    for token in range(10, 16):  # decode: one new token per step
        req.append_token(token)
        assert kv.allocate_slots(req, 1)
        req.num_computed_tokens += 1
        grown.append(len(kv.block_ids("a")))
    # 4, 5, 6, 7, 8, 9 tokens
    assert grown == [1, 2, 2, 2, 2, 3]
    assert kv.block_ids("a") == [0, 1, 2]


def test_chunked_allocation_matches_the_computed_tokens():
    kv = KVCacheManager(8, 4)
    req = make("a", list(range(13)))
    for chunk, expected in [(3, 1), (3, 2), (5, 3), (2, 4)]:
        assert kv.allocate_slots(req, chunk)
        req.num_computed_tokens += chunk
        assert len(kv.block_ids("a")) == expected
    assert req.num_computed_tokens == 13


def test_allocate_slots_refuses_without_changing_anything():
    kv = KVCacheManager(3, 4)
    a = make("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    b = make("b", list(range(5)))
    assert not kv.allocate_slots(b, 5)
    assert kv.block_ids("b") == []
    assert "b" not in kv._blocks
    assert (kv.pool.num_used, kv.pool.num_free) == (2, 1)
    # A request that already holds blocks keeps them when it cannot grow.
    a.num_computed_tokens = 8
    a.all_token_ids.extend([8, 9, 10, 11, 12])
    assert not kv.allocate_slots(a, 5)
    assert kv.block_ids("a") == [0, 1]
    assert kv.pool.num_used == 2


def test_free_returns_a_requests_blocks_and_is_idempotent():
    kv = KVCacheManager(4, 2)
    req = make("a", [1, 2, 3])
    assert kv.allocate_slots(req, 3)
    assert kv.pool.num_used == 2
    kv.free(req)
    assert kv.block_ids("a") == []
    assert (kv.pool.num_used, kv.pool.num_free) == (0, 4)
    kv.free(req)  # nothing held any more: nothing to drop
    assert kv.pool.num_free == 4


def test_usage_follows_the_pool():
    kv = KVCacheManager(4, 2)
    assert kv.num_blocks == 4
    assert kv.allocate_slots(make("a", [1, 2, 3]), 3)
    assert kv.usage() == 0.5


# -- the manager: prefix cache -----------------------------------------------------------------


def test_a_second_request_finds_the_first_requests_full_blocks():
    kv = KVCacheManager(16, 4)
    a = make("a", list(range(1, 11)))  # 10 tokens: 2 full blocks and a partial one
    assert compute(kv, a) == []
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.pool.num_cached == 2
    b = make("b", list(range(1, 9)) + [70, 71, 72])
    assert ids(kv.find_cached_prefix(b)) == [0, 1]
    assert compute(kv, b) == [0, 1]
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    assert kv.pool.num_used == 4


def test_lookup_always_leaves_a_token_to_compute():
    kv = KVCacheManager(16, 4)
    compute(kv, make("a", list(range(1, 13))))  # 3 full blocks, all cached
    assert kv.pool.num_cached == 3
    # Exactly two full blocks: the last token must be computed, so only the first block counts.
    assert ids(kv.find_cached_prefix(make("b", list(range(1, 9))))) == [0]
    assert ids(kv.find_cached_prefix(make("c", list(range(1, 10))))) == [0, 1]
    assert ids(kv.find_cached_prefix(make("d", list(range(1, 5))))) == []
    assert ids(kv.find_cached_prefix(make("e", list(range(1, 13))))) == [0, 1]
    assert ids(kv.find_cached_prefix(make("f", list(range(1, 14))))) == [0, 1, 2]


def test_a_different_token_inside_a_block_stops_the_match():
    kv = KVCacheManager(16, 4)
    compute(kv, make("a", list(range(1, 14))))  # blocks [1..4] [5..8] [9..12] cached
    assert ids(kv.find_cached_prefix(make("b", [1, 2, 3, 4, 5, 6, 0, 8, 9, 10, 11, 12, 13]))) == [0]
    assert ids(kv.find_cached_prefix(make("c", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 13]))) == [0, 1]
    assert ids(kv.find_cached_prefix(make("d", [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]))) == []
    # The same block of tokens later on is not a prefix match either.
    assert ids(kv.find_cached_prefix(make("e", [5, 6, 7, 8, 9, 10, 11, 12, 13]))) == []


def test_no_prefix_cache_when_disabled():
    kv = KVCacheManager(16, 4, enable_prefix_caching=False)
    a = make("a", list(range(1, 11)))
    compute(kv, a)
    assert kv.pool.num_cached == 0
    assert kv.find_cached_prefix(make("b", list(range(1, 11)))) == []


def test_shared_prefix_blocks_are_reference_counted():
    kv = KVCacheManager(8, 4)
    a = make("a", list(range(1, 10)))  # blocks 0, 1 full; 2 partial
    b = make("b", list(range(1, 9)) + [50, 51])
    compute(kv, a)
    assert compute(kv, b) == [0, 1]
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert kv.pool.num_used == 4
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [1, 1, 0, 1]
    assert (kv.pool.num_used, kv.pool.num_free) == (3, 5)
    # The shared blocks are still held by b, so nothing can take them.
    assert ids(kv.pool.allocate(5)) == [2, 4, 5, 6, 7]
    assert kv.block_ids("b") == [0, 1, 3]
    kv.free(b)
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 3)] == [0, 0, 0]
    assert kv.pool.num_used == 5


def test_a_freed_requests_blocks_stay_findable_until_reused():
    kv = KVCacheManager(4, 2)
    a = make("a", [1, 2, 3, 4, 5])  # blocks [1,2] [3,4] cached, [5] not
    compute(kv, a)
    kv.forget(a)
    assert (kv.pool.num_used, kv.pool.num_cached) == (0, 2)
    b = make("b", [1, 2, 3, 4, 6])
    assert compute(kv, b) == [0, 1]
    assert kv.block_ids("b") == [0, 1, 2]
    assert b.num_computed_tokens == 5


def test_a_requests_tail_is_evicted_before_its_prefix():
    kv = KVCacheManager(4, 2)
    a = make("a", [1, 2, 3, 4, 5, 6, 7])  # 3 full cached blocks (0, 1, 2), block 3 partial
    compute(kv, a)
    assert kv.pool.num_cached == 3
    kv.forget(a)
    # Block 3 held nothing cached and goes first, then the tail before the prefix.
    assert ids(kv.pool.allocate(1)) == [3]
    assert ids(kv.pool.allocate(1)) == [2]
    assert ids(kv.find_cached_prefix(make("b", [1, 2, 3, 4, 5, 6, 7]))) == [0, 1]
    assert ids(kv.pool.allocate(1)) == [1]
    assert ids(kv.find_cached_prefix(make("c", [1, 2, 3, 4, 5, 6, 7]))) == [0]


def test_cached_blocks_in_the_free_queue_count_against_the_allocation():
    kv = KVCacheManager(3, 2)
    a = make("a", [1, 2, 3, 4, 5])
    compute(kv, a)
    kv.forget(a)  # all 3 blocks free, 0 and 1 cached
    b = make("b", [1, 2, 3, 4, 9, 9, 9])  # needs 4 blocks: 2 cached + 2 new, but only 1 is left
    cached = kv.find_cached_prefix(b)
    assert ids(cached) == [0, 1]
    assert not kv.allocate_slots(b, 3, cached)
    assert [kv.pool.blocks[i].ref_cnt for i in range(3)] == [0, 0, 0]
    assert kv.pool.num_free == 3
    c = make("c", [1, 2, 3, 4, 9, 9])  # 3 blocks: 2 cached + 1 new fits exactly
    cached = kv.find_cached_prefix(c)
    assert kv.allocate_slots(c, 2, cached)
    assert kv.block_ids("c") == [0, 1, 2]
    assert kv.pool.num_free == 0


def test_two_identical_prompts_computed_together_collapse_onto_one_cached_copy():
    kv = KVCacheManager(8, 2)
    a, b = make("a", [1, 2, 3, 4, 5]), make("b", [1, 2, 3, 4, 5])
    # Both admitted in the same step: neither finds anything yet.
    for req in (a, b):
        assert kv.allocate_slots(req, 5, kv.find_cached_prefix(req))
    for req in (a, b):
        req.num_computed_tokens = 5
        kv.cache_full_blocks(req)
    assert kv.block_ids("a") == [0, 1, 2] and kv.block_ids("b") == [3, 4, 5]
    assert kv.pool.num_cached == 2  # b's duplicates stay private
    # b's later blocks chain onto a's cached copy, so they are findable too.
    for req, token in ((b, 60), (b, 61)):
        req.append_token(token)
    assert kv.allocate_slots(b, 2)
    b.num_computed_tokens = 7
    kv.cache_full_blocks(b)
    assert kv.block_ids("b") == [3, 4, 5, 6]
    assert ids(kv.find_cached_prefix(make("c", [1, 2, 3, 4, 5, 60, 61, 0]))) == [0, 1, 5]


def test_forget_drops_the_requests_hashes():
    kv = KVCacheManager(4, 2)
    a = make("a", [1, 2, 3])
    compute(kv, a)
    assert "a" in kv._hashes
    kv.forget(a)
    assert "a" not in kv._hashes and "a" not in kv._canonical and kv.block_ids("a") == []


# -- hash collisions never hand out wrong blocks ----------------------------------------------


def test_chain_hash_depends_on_parent_and_tokens():
    h = chain_hash(ROOT_HASH, (1, 2))
    assert h == chain_hash(ROOT_HASH, (1, 2))
    assert h != chain_hash(ROOT_HASH, (2, 1))
    assert h != chain_hash(h, (1, 2))


def test_constant_hash_lookups_verify_tokens(monkeypatch):
    monkeypatch.setattr(kv_manager, "chain_hash", lambda parent, tokens: 7)
    kv = KVCacheManager(16, 4)
    a = make("a", list(range(1, 14)))
    compute(kv, a)
    # Every block hashes alike, so only the first one can be registered.
    assert kv.pool.num_cached == 1
    assert ids(kv.find_cached_prefix(make("b", list(range(1, 14))))) == [0]
    assert kv.find_cached_prefix(make("c", [9, 9, 9, 9, 9])) == []
    # A second block with the first block's tokens, at position 1, is no first block.
    assert ids(kv.find_cached_prefix(make("d", [1, 2, 3, 4, 1, 2, 3, 4, 0]))) == [0]


def test_parent_blind_hash_lookups_verify_parents(monkeypatch):
    monkeypatch.setattr(kv_manager, "chain_hash", lambda parent, tokens: hash(tokens))
    kv = KVCacheManager(16, 4)
    a = make("a", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    b = make("b", [9, 9, 9, 9, 5, 6, 7, 8, 0])
    compute(kv, a)
    assert compute(kv, b) == []
    assert kv.block_ids("a") == [0, 1, 2] and kv.block_ids("b") == [3, 4, 5]
    # b's second block collides with a's and is not registered.
    assert kv.pool.num_cached == 3
    assert kv.pool.blocks[4].block_hash is None
    # Same tokens as a's second block, but after b's first block: only that first block matches.
    assert ids(kv.find_cached_prefix(make("c", [9, 9, 9, 9, 5, 6, 7, 8, 1]))) == [3]
    assert ids(kv.find_cached_prefix(make("d", [1, 2, 3, 4, 5, 6, 7, 8, 1]))) == [0, 1]


def test_a_block_registered_after_its_parent_was_reused_is_not_found_through_the_new_parent(monkeypatch):
    """Regression: r's second block chained onto q's first block (r's own copy of it collided), q's
    block was freed and reused for other content, and r then registered its second block under
    that reused block, so a lookup through the new content returned r's keys and values."""
    monkeypatch.setattr(kv_manager, "chain_hash", lambda parent, tokens: hash(tokens))
    kv = KVCacheManager(4, 4)
    q = make("q", [1, 2, 3, 4, 9, 9, 9, 9, 0])
    r = make("r", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    # One step: q computes its whole prompt, r only its first block (a chunk).
    assert kv.allocate_slots(q, 9) and kv.allocate_slots(r, 4)
    assert kv.block_ids("q") == [0, 1, 2] and kv.block_ids("r") == [3]
    q.num_computed_tokens, r.num_computed_tokens = 9, 4
    kv.cache_full_blocks(q)
    kv.cache_full_blocks(r)
    assert kv.pool.blocks[3].block_hash is None  # q's block 0 holds the same content
    q.append_token(50)
    kv.forget(q)
    # Next step: r computes the rest while w takes q's first block for other tokens.
    w = make("w", [7, 7, 7, 7])
    assert kv.allocate_slots(r, 5) and kv.allocate_slots(w, 4)
    assert kv.block_ids("r") == [3, 2, 1] and kv.block_ids("w") == [0]
    r.num_computed_tokens, w.num_computed_tokens = 9, 4
    kv.cache_full_blocks(r)
    kv.cache_full_blocks(w)
    # Block 2 was computed after [1, 2, 3, 4], never after [7, 7, 7, 7].
    assert ids(kv.find_cached_prefix(make("u", [7, 7, 7, 7, 5, 6, 7, 8, 0]))) == [0]
    assert kv.find_cached_prefix(make("v", [1, 2, 3, 4, 5, 6, 7, 8, 0])) == []


def test_a_stale_entry_gives_its_hash_to_the_live_chain():
    pool = BlockPool(4)
    parent, child = pool.allocate(2)
    pool.register(parent, 11, (1, 2), None)
    pool.register(child, 22, (3, 4), parent)
    pool.free([child, parent])
    # The parent is handed out again (its generation moves on); the child stays cached.
    (reused,) = [b for b in pool.allocate(4) if b is parent]
    assert pool.lookup(22, (3, 4), reused) is None
    pool.free([b for b in pool.blocks if b.ref_cnt])
    new_parent, new_child = pool.allocate(2)
    pool.register(new_parent, 11, (1, 2), None)
    pool.register(new_child, 22, (3, 4), new_parent)
    assert pool.lookup(22, (3, 4), new_parent) is new_child
