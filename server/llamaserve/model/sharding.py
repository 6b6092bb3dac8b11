"""Which slice of every weight a tensor-parallel rank owns (arithmetic only, torch-free).

Attention is split by heads and the MLP by its intermediate columns; the vocabulary is split into
equal shards padded up to a multiple of the rank count. Grouped-query attention with fewer KV heads
than ranks replicates each KV head on `tp / num_key_value_heads` consecutive ranks: the query heads of
a rank then all belong to the one KV head it holds.
"""

from dataclasses import dataclass

from .architecture import ModelArchitecture


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0  # this process's rank, 0 .. size - 1; rank 0 samples
    size: int = 1  # ranks every layer is split across

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside a tensor-parallel group of {self.size}")

    def shard(self, total: int, num_shards: int | None = None) -> tuple[int, int]:
        """[start, stop) of this rank's part of `total` items cut into `num_shards` equal shards (default:
        one per rank). With fewer shards than ranks, consecutive ranks share (replicate) a shard."""
        num_shards = num_shards or self.size
        if total % num_shards:
            raise ValueError(f"{total} items cannot be split into {num_shards} equal shards")
        size = total // num_shards
        index = self.rank * num_shards // self.size
        return index * size, (index + 1) * size

    def vocab_shard(self, vocab_size: int) -> tuple[int, int, int]:
        """(start, stop, padded shard size) of this rank's vocabulary rows; the last shard may be short."""
        size = -(-vocab_size // self.size)
        start = min(self.rank * size, vocab_size)
        return start, min(start + size, vocab_size), size


def heads_per_rank(arch: ModelArchitecture, tp: int) -> tuple[int, int]:
    """(query heads, KV heads) on each rank; ValueError for a tp the model cannot be split by."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, not {tp}")
    heads, kv = arch.num_attention_heads, arch.num_key_value_heads
    if heads % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide num_attention_heads ({heads})")
    if tp > kv:
        if tp % kv:
            raise ValueError(
                f"tensor_parallel_size {tp} exceeds num_key_value_heads ({kv}) but is not a multiple of it, "
                "so KV heads cannot be replicated evenly"
            )
        kv_per_rank = 1
    elif kv % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide num_key_value_heads ({kv})")
    else:
        kv_per_rank = kv // tp
    if arch.intermediate_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} does not divide intermediate_size ({arch.intermediate_size})")
    return heads // tp, kv_per_rank
