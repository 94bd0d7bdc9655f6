"""BlockManager: ref counts, LRU free queue, exact prefix caching, integrity checks (no torch model)."""
import pytest

from cluster.core.block_manager import BlockManager
from cluster.request import Request
from cluster.sampling import SamplingParams

pytestmark = pytest.mark.timeout(60)

BS = 4


def make_req(rid, tokens, max_tokens=8):
    return Request(request_id=rid, prompt_token_ids=list(tokens), sampling_params=SamplingParams(max_tokens=max_tokens))


def admit(bm, req, num_new=None):
    """What the scheduler does on first scheduling: look up the cache, allocate, compute, register."""
    blocks, cached = bm.get_computed_blocks(req)
    req.num_computed_tokens = cached
    n = req.num_tokens - cached if num_new is None else num_new
    new = bm.allocate_slots(req, n, blocks)
    if new is None:
        req.num_computed_tokens = 0
        return None, blocks
    req.num_computed_tokens += n
    bm.cache_full_blocks(req)
    bm.check_integrity()
    return new, blocks


def test_allocate_grow_free_and_integrity():
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = make_req("a", range(10))
    new = bm.allocate_slots(r, 10)
    assert len(new) == 3 and bm.get_block_table("a") == new
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    r.num_computed_tokens = 10
    assert bm.allocate_slots(r, 2) == []  # positions 10, 11 fit in block 3
    r.num_computed_tokens = 12
    assert len(bm.allocate_slots(r, 1)) == 1
    bm.check_integrity()
    bm.free(r)
    bm.free(r)  # idempotent
    bm.free(make_req("unknown", [1]))
    assert bm.get_block_table("a") == [] and bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_integrity()


def test_allocate_returns_none_and_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_req("a", range(8))
    assert len(bm.allocate_slots(a, 8)) == 2
    b = make_req("b", range(100, 109))
    assert bm.allocate_slots(b, 9) is None
    assert bm.get_block_table("b") == [] and bm.num_free_blocks == 1
    a.num_computed_tokens = 8
    assert bm.allocate_slots(a, 5) is None  # needs 2 more, 1 free
    assert len(bm.get_block_table("a")) == 2
    bm.check_integrity()
    with pytest.raises(ValueError):
        bm.allocate_slots(a, -1)


@pytest.mark.parametrize("corruption", ["leak", "free_with_ref", "double_owned", "dup_in_table", "count"])
def test_check_integrity_detects_corruption(corruption):
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = make_req("a", range(8)), make_req("b", range(8, 16))
    bm.allocate_slots(a, 8)
    bm.allocate_slots(b, 8)
    bm.check_integrity()
    ta = bm.get_block_table("a")
    if corruption == "leak":  # table dropped without releasing refs, then refs zeroed: block lost
        bm._tables.pop("a")
        for blk in ta:
            bm._ref_counts[blk] = 0
        match = "leaked"
    elif corruption == "free_with_ref":
        bm._free[ta[0]] = None
        match = "free queue"
    elif corruption == "double_owned":
        bm.get_block_table("b").append(ta[0])
        match = "ref count"
    elif corruption == "dup_in_table":
        ta.append(ta[0])
        bm._ref_counts[ta[0]] += 1
        match = "more than once"
    else:
        bm._free.popitem()
        bm._ref_counts.append(0)
        match = "ref counts for"
    with pytest.raises(AssertionError, match=match):
        bm.check_integrity()


def test_prefix_cache_hit_reuses_blocks_and_counts():
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = make_req("a", prompt)
    new_a, _ = admit(bm, a)
    assert bm.num_cached_blocks == 2  # the partial third block is never cached
    b = make_req("b", prompt + [99])
    queries_before = bm.prefix_cache_queries
    new_b, hit = admit(bm, b)
    assert hit == new_a[:2] and b.num_computed_tokens == 11
    assert bm.get_block_table("b")[:2] == new_a[:2] and len(new_b) == 1
    assert bm.prefix_cache_hits == 2 and bm.prefix_cache_queries - queries_before == 2
    assert bm._ref_counts[new_a[0]] == 2
    bm.free(a)
    bm.free(b)
    bm.check_integrity()
    assert bm.num_free_blocks == 10


def test_last_prompt_token_never_in_a_cached_hit():
    bm = BlockManager(num_blocks=10, block_size=BS)
    prompt = list(range(8))  # exactly 2 blocks: block 1 holds the last prompt token
    a = make_req("a", prompt)
    admit(bm, a)
    b = make_req("b", prompt)
    blocks, cached = bm.get_computed_blocks(b)
    assert len(blocks) == 1 and cached == 4  # (8 - 1) // 4 = 1 block considered
    one = make_req("c", prompt[:4])
    assert bm.get_computed_blocks(one) == ([], 0)  # (4 - 1) // 4 = 0
    # a longer prompt sharing both blocks does reuse the second one
    assert bm.get_computed_blocks(make_req("d", prompt + [1]))[1] == 8


def test_only_computed_prompt_blocks_are_cached():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = make_req("a", range(12))
    bm.allocate_slots(a, 12)
    a.num_computed_tokens = 7  # chunked prefill: only block 0 fully computed
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 1
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 3
    a.output_token_ids += [1, 2, 3, 4]  # output blocks are never cached
    a.num_computed_tokens = 16
    bm.allocate_slots(a, 0)
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 3
    bm.check_integrity()


def test_exact_keys_different_prompts_never_share():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = make_req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, a)
    # same second block, different first block: no hit at all
    b = make_req("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.get_computed_blocks(b) == ([], 0)
    # same first block, different second block: one block hit
    c = make_req("c", [1, 2, 3, 4, 5, 6, 7, 0, 9])
    assert len(bm.get_computed_blocks(c)[0]) == 1
    # disabled cache never hits
    off = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    admit(off, make_req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert off.get_computed_blocks(make_req("x", [1, 2, 3, 4, 5, 6, 7, 8, 9])) == ([], 0)


def test_lru_eviction_of_cached_blocks():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_req("a", list(range(8)) + [50])  # 3 blocks, 2 cached
    admit(bm, a)
    bm.free(a)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    # the never-used block 3 goes first, then a's tail (freed first): partial block, then block 1
    x = make_req("x", [100, 101, 102, 103, 104])
    new_x, _ = admit(bm, x)  # 2 blocks
    assert bm.num_cached_blocks == 2 + 1  # x's first block registered, a's cached blocks survive
    y = make_req("y", [200, 201, 202])
    admit(bm, y)  # takes a's block 1 (cached): evicted
    assert bm.num_cached_blocks == 2
    blocks, cached = bm.get_computed_blocks(make_req("a2", list(range(8)) + [50]))
    assert cached == 4  # only a's first block is still cached
    bm.check_integrity()


def test_revival_of_freed_cached_block():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = list(range(9))
    a = make_req("a", prompt)
    new_a, _ = admit(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4
    b = make_req("b", prompt)
    new_b, hit = admit(bm, b)
    assert hit == new_a[:2] and bm.get_block_table("b")[:2] == new_a[:2]
    assert all(blk not in bm._free for blk in hit) and bm._ref_counts[hit[0]] == 1
    assert bm.num_free_blocks == 1
    # not enough room for computed blocks + new ones: nothing changes
    bm.free(b)
    c = make_req("c", prompt + list(range(100, 120)))
    blocks, cached = bm.get_computed_blocks(c)
    c.num_computed_tokens = cached
    assert bm.allocate_slots(c, c.num_tokens - cached, blocks) is None
    assert bm.num_free_blocks == 4 and bm.get_block_table("c") == []
    bm.check_integrity()
    with pytest.raises(ValueError, match="not in the prefix cache"):
        bm.allocate_slots(make_req("d", prompt), 1, [3 if 3 not in hit else 2])


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=6, block_size=BS)
    prompt = list(range(9))
    a = make_req("a", prompt)
    admit(bm, a)
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.get_computed_blocks(make_req("b", prompt)) == ([], 0)
    bm.check_integrity()
    bm.free(a)
    bm.check_integrity()
