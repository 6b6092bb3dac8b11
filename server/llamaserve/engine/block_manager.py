"""Paged KV cache bookkeeping: block tables, reference counts, a free pool and the prefix cache.

Holds no device state; block ids 0..num_blocks-1 index the model runner's KV tensors.

Every block is in exactly one state:
  owned      refcount == number of block tables holding it; never in the free pool.
  evictable  refcount 0, still hashed: a later request with the same prefix may revive it.
  empty      refcount 0, no hash.
New blocks come from the empty pool first, then by evicting the least recently freed evictable
block. A full block is keyed by sha256(parent block's key + its token ids), so a hit on block i
implies the whole prefix up to block i matches. A cryptographic hash, because a collision would
hand one client's KV (another client's prompt) to another: Python's hash() of ints is easy to collide.
"""

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from llamaserve.engine.request import Request

def _root_hash(request: Request) -> bytes:
    """The "parent hash" of a sequence's first block: K/V computed under one adapter never serve another."""
    return b"" if request.lora is None else hashlib.sha256(b"lora:" + request.lora.encode()).digest()


@dataclass(slots=True)
class _Sequence:
    """What the block manager remembers about one request."""

    block_ids: list[int] = field(default_factory=list)
    # Chain hashes of the request's full blocks, computed lazily and kept (tokens only grow).
    block_hashes: list[bytes] = field(default_factory=list)
    # Leading blocks already offered to the prefix cache (registered, or hits to begin with).
    num_cached_blocks: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hash_of_block: list[bytes | None] = [None] * num_blocks
        self._block_of_hash: dict[bytes, int] = {}
        self._empty: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        self._seqs: dict[str, _Sequence] = {}
        self.prefix_queries_tokens = 0  # tokens looked up in the prefix cache at admission
        self.prefix_hits_tokens = 0  # of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        return len(self._empty) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by requests (evictable cached blocks count as free)."""
        return 1 - self.num_free_blocks / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        """The request's block ids in token order (the live list: read it, don't keep it)."""
        seq = self._seqs.get(request_id)
        return seq.block_ids if seq is not None else []

    def match_prefix(self, request: Request) -> int:
        """How many leading tokens of a not-yet-allocated request are cached (a multiple of block_size)."""
        return len(self._cached_prefix(request)) * self.block_size

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Makes room for num_new_tokens more tokens after request.num_computed_tokens.

        On a request's first allocation it first claims the cached prefix that match_prefix
        reports and sets request.num_computed_tokens to it. Returns False, changing nothing,
        when the free pool is too small.
        """
        seq = self._seqs.setdefault(request.request_id, _Sequence())
        first = not seq.block_ids
        hits = self._cached_prefix(request) if first else []
        num_computed = len(hits) * self.block_size if first else request.num_computed_tokens
        num_blocks = -(-(num_computed + num_new_tokens) // self.block_size)
        num_fresh = max(num_blocks - len(seq.block_ids) - len(hits), 0)
        num_revived = sum(1 for block in hits if self._ref_counts[block] == 0)  # hits now in the free pool
        if num_fresh + num_revived > self.num_free_blocks:
            return False
        if first:
            request.num_computed_tokens = num_computed
            request.num_cached_prompt_tokens = min(num_computed, request.num_prompt_tokens)
            seq.num_cached_blocks = len(hits)
            if self.enable_prefix_caching:
                self.prefix_queries_tokens += request.num_tokens
                self.prefix_hits_tokens += num_computed
        for block in hits:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
            seq.block_ids.append(block)
        for _ in range(num_fresh):
            seq.block_ids.append(self._take_free_block())
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Registers the request's blocks that became full of computed tokens in the prefix cache.

        When another block already holds the same prefix, the request keeps its own copy
        unregistered (the running batch's block table stays valid; no swap).
        """
        if not self.enable_prefix_caching:
            return
        seq = self._seqs[request.request_id]
        num_full = min(request.num_computed_tokens // self.block_size, len(seq.block_ids))
        for i in range(seq.num_cached_blocks, num_full):
            block_hash = self._block_hash(request, seq, i)
            if block_hash not in self._block_of_hash:
                block = seq.block_ids[i]
                self._block_of_hash[block_hash] = block
                self._hash_of_block[block] = block_hash
        seq.num_cached_blocks = max(seq.num_cached_blocks, num_full)

    def free(self, request: Request) -> None:
        """Releases the request's blocks; cached ones stay reusable until evicted. Unknown ids are a no-op."""
        seq = self._seqs.pop(request.request_id, None)
        if seq is None:
            return
        # Tail first: the least recently freed block is evicted first, so a prefix outlives its tail.
        for block in reversed(seq.block_ids):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._hash_of_block[block] is None:
                    self._empty.append(block)
                else:
                    self._evictable[block] = None

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix; owned blocks stay with their requests."""
        for block in self._block_of_hash.values():
            self._hash_of_block[block] = None
        self._block_of_hash.clear()
        self._empty.extend(self._evictable)
        self._evictable.clear()

    def check_integrity(self) -> None:
        """Raises AssertionError unless every block is exactly one of owned, evictable or empty."""
        holders = [0] * self.num_blocks
        for request_id, seq in self._seqs.items():
            _require(len(set(seq.block_ids)) == len(seq.block_ids), f"{request_id}'s block table repeats a block")
            for block in seq.block_ids:
                holders[block] += 1
        free = [*self._empty, *self._evictable]
        free_set = set(free)
        _require(len(free_set) == len(free), "a block is in the free pool twice")
        for block in range(self.num_blocks):
            refs, is_free = self._ref_counts[block], block in free_set
            _require(refs == holders[block], f"block {block}: refcount {refs} but {holders[block]} tables hold it")
            _require(is_free == (refs == 0), f"block {block}: refcount {refs} but in free pool: {is_free}")
        for block in self._empty:
            _require(self._hash_of_block[block] is None, f"empty block {block} still has a hash")
        for block in self._evictable:
            _require(self._hash_of_block[block] is not None, f"evictable block {block} has no hash")
        for block_hash, block in self._block_of_hash.items():
            _require(self._hash_of_block[block] == block_hash, f"hash map points at block {block} with another hash")
        num_hashed = sum(h is not None for h in self._hash_of_block)
        _require(num_hashed == len(self._block_of_hash), "a block carries a hash the hash map does not know")

    def _cached_prefix(self, request: Request) -> list[int]:
        """Cached block ids holding the request's leading full blocks, up to the first miss."""
        if not self.enable_prefix_caching:
            return []
        seq = self._seqs.setdefault(request.request_id, _Sequence())
        # Leave at least one token to compute: the step must produce its logits.
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for i in range(max_blocks):
            block = self._block_of_hash.get(self._block_hash(request, seq, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def _block_hash(self, request: Request, seq: _Sequence, index: int) -> bytes:
        """Chain hash of the request's full block `index`, memoized in seq.block_hashes."""
        hashes = seq.block_hashes
        for i in range(len(hashes), index + 1):
            parent = hashes[i - 1] if i else _root_hash(request)
            tokens = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
            hashes.append(hashlib.sha256(parent + array("q", tokens).tobytes()).digest())
        return hashes[index]

    def _take_free_block(self) -> int:
        if self._empty:
            block = self._empty.popleft()
        else:  # evict the least recently freed cached block
            block, _ = self._evictable.popitem(last=False)
            del self._block_of_hash[self._hash_of_block[block]]
            self._hash_of_block[block] = None
        self._ref_counts[block] = 1
        return block


def _require(condition: bool, message: str) -> None:
    if not condition:  # not `assert`: the check must also run under python -O
        raise AssertionError(message)
