"""BlockManager on CPU: allocation, reference counts, prefix caching, LRU eviction, integrity."""

import pytest

from llamaserve.engine.block_manager import BlockManager
from llamaserve.engine.request import Request
from llamaserve.sampling_params import SamplingParams


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=8))


def compute_all(manager: BlockManager, request: Request) -> None:
    """Allocates and 'computes' every token of the request, as one prefill step would."""
    num_cached = manager.match_prefix(request)
    assert manager.allocate(request, request.num_tokens - num_cached)
    request.num_computed_tokens = request.num_tokens
    manager.cache_full_blocks(request)
    manager.check_integrity()


def test_allocate_grows_and_free_returns_every_block():
    manager = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    request = make_request("a", list(range(10)))
    assert manager.allocate(request, 10)
    assert len(manager.block_table("a")) == 3  # ceil(10 / 4)
    request.num_computed_tokens = 10
    assert manager.allocate(request, 2)  # 12 tokens still fit in 3 blocks
    assert len(manager.block_table("a")) == 3
    request.num_computed_tokens = 12
    assert manager.allocate(request, 1)
    assert len(manager.block_table("a")) == 4
    assert manager.num_free_blocks == 6 and manager.usage == pytest.approx(0.4)
    manager.check_integrity()
    manager.free(request)
    manager.free(request)  # a second free is a no-op
    assert manager.num_free_blocks == 10 and manager.usage == 0
    assert manager.block_table("a") == []
    manager.check_integrity()


def test_allocate_fails_without_side_effects_when_pool_is_short():
    manager = BlockManager(num_blocks=4, block_size=4)
    first, second = make_request("a", list(range(12))), make_request("b", list(range(100, 108)))
    assert manager.allocate(first, 12)
    assert not manager.allocate(second, 8)  # needs 2 blocks, 1 free
    assert manager.block_table("b") == [] and manager.num_free_blocks == 1
    assert second.num_computed_tokens == 0
    manager.check_integrity()


def test_shared_prefix_hits_192_of_200_tokens():
    manager = BlockManager(num_blocks=64, block_size=16)
    prefix = list(range(1000, 1200))  # 200 tokens: 12 full blocks + 8
    first = make_request("a", prefix)
    compute_all(manager, first)
    second = make_request("b", prefix + list(range(40)))
    assert manager.match_prefix(second) == 192
    assert manager.allocate(second, second.num_tokens - 192)
    assert second.num_computed_tokens == 192 and second.num_cached_prompt_tokens == 192
    assert manager.block_table("b")[:12] == manager.block_table("a")[:12]
    assert manager.block_table("b")[12] != manager.block_table("a")[12]  # partial block is private
    assert manager.prefix_hits_tokens == 192
    assert manager.prefix_queries_tokens == 200 + 240
    manager.check_integrity()


def test_prefix_hit_leaves_at_least_one_token_to_compute():
    manager = BlockManager(num_blocks=16, block_size=4)
    compute_all(manager, make_request("a", list(range(8))))
    same = make_request("b", list(range(8)))  # identical 2-block prompt
    assert manager.match_prefix(same) == 4  # (8 - 1) // 4 blocks: the last token is recomputed
    assert manager.allocate(same, 4)
    assert same.num_computed_tokens == 4 and len(manager.block_table("b")) == 2
    manager.check_integrity()


def test_cached_blocks_survive_free_and_are_reused():
    manager = BlockManager(num_blocks=8, block_size=4)
    first = make_request("a", list(range(10)))
    compute_all(manager, first)
    cached_blocks = manager.block_table("a")[:2]
    manager.free(first)
    assert manager.num_free_blocks == 8  # cached blocks count as free
    manager.check_integrity()
    second = make_request("b", list(range(10)) + [77])
    assert manager.match_prefix(second) == 8
    assert manager.allocate(second, 3)
    assert manager.block_table("b")[:2] == cached_blocks
    assert manager.num_free_blocks == 5
    manager.check_integrity()


def test_lru_eviction_takes_empty_blocks_first_then_oldest_tail_first():
    manager = BlockManager(num_blocks=8, block_size=4)
    old, new = make_request("old", list(range(9))), make_request("new", list(range(50, 59)))
    for request in (old, new):  # each: 2 full cached blocks + 1 partial block
        compute_all(manager, request)
        manager.free(request)
    assert manager.num_free_blocks == 8
    # 4 empty blocks are used before any cached block is evicted.
    filler = make_request("filler", list(range(200, 216)))
    assert manager.allocate(filler, 16)
    assert manager.match_prefix(make_request("old2", list(range(9)))) == 8
    manager.free(filler)  # back to the empty pool: filler was never cached
    # One more than the empty pool: evicts the least recently freed block, old's tail.
    filler = make_request("filler", list(range(200, 220)))
    assert manager.allocate(filler, 20)
    assert manager.match_prefix(make_request("old3", list(range(9)))) == 4
    assert manager.match_prefix(make_request("new2", list(range(50, 59)))) == 8
    manager.check_integrity()
    # Two more evictions: old's head, then new's tail.
    extra = make_request("extra", list(range(300, 305)))
    assert manager.allocate(extra, 5)
    assert manager.match_prefix(make_request("old4", list(range(9)))) == 0
    assert manager.match_prefix(make_request("new3", list(range(50, 59)))) == 4
    manager.check_integrity()


def test_identical_blocks_computed_twice_keep_one_cache_entry():
    manager = BlockManager(num_blocks=8, block_size=4)
    twins = [make_request(name, list(range(9))) for name in ("a", "b")]
    for request in twins:  # both allocated before either computed: no hits
        assert manager.allocate(request, 9)
    for request in twins:
        request.num_computed_tokens = 9
        manager.cache_full_blocks(request)
        manager.check_integrity()
    for request in twins:
        manager.free(request)
        manager.check_integrity()
    assert manager.match_prefix(make_request("c", list(range(9)))) == 8


def test_prefix_caching_disabled_never_hits():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    first = make_request("a", list(range(9)))
    compute_all(manager, first)
    manager.free(first)
    assert manager.match_prefix(make_request("b", list(range(9)))) == 0
    manager.check_integrity()


def test_reset_prefix_cache_forgets_free_and_owned_hashes():
    manager = BlockManager(num_blocks=8, block_size=4)
    first, second = make_request("a", list(range(9))), make_request("b", list(range(20, 29)))
    compute_all(manager, first)
    compute_all(manager, second)
    manager.free(first)
    manager.reset_prefix_cache()
    manager.check_integrity()
    assert manager.match_prefix(make_request("c", list(range(9)))) == 0
    assert manager.match_prefix(make_request("d", list(range(20, 29)))) == 0


def corrupt_refcount(manager):
    manager._ref_counts[manager.block_table("a")[0]] += 1


def corrupt_free_owned_block(manager):
    manager._empty.append(manager.block_table("a")[0])


def corrupt_free_twice(manager):
    manager._empty.append(manager._empty[0])


def corrupt_hash_map(manager):
    block_hash = next(iter(manager._block_of_hash))
    manager._block_of_hash[block_hash] = manager.block_table("a")[2]


def corrupt_stray_hash(manager):
    manager._hash_of_block[manager.block_table("a")[2]] = b"stray"


@pytest.mark.parametrize(
    "corrupt",
    [corrupt_refcount, corrupt_free_owned_block, corrupt_free_twice, corrupt_hash_map, corrupt_stray_hash],
)
def test_check_integrity_catches_corruption(corrupt):
    manager = BlockManager(num_blocks=8, block_size=4)
    compute_all(manager, make_request("a", list(range(9))))
    corrupt(manager)
    with pytest.raises(AssertionError):
        manager.check_integrity()
