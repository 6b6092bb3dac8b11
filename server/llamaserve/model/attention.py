"""Paged attention: per-step metadata for a flat batch of many sequences, and the backends behind one call.

A step's tokens are flat ([num_tokens]): each sequence contributes `query_len` new tokens (a prefill
chunk or one decode token) whose K/V are written into cache slots, then attend over the sequence's
whole context (cached tokens + new ones) through its block table. No sequence is padded to another's
length on the way in or out.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    query_lens: list[int]  # new tokens per sequence this step
    seq_lens: list[int]  # tokens per sequence once this step's are in the cache (context + new)
    block_tables: list[list[int]]  # per sequence, the cache blocks that hold its tokens in order
    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] long: cache slot (block * block_size + offset) of each new token
    token_seq_lens: torch.Tensor  # [num_tokens] long: seq_len of each token's sequence (dynamic RoPE)
    logits_indices: torch.Tensor  # [num_sampled] long: flat positions whose logits are wanted

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        sample: list[bool] | None = None,
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """`sample[i]` says whether sequence i wants the logits of its last new token (default: all do)."""
        slots, token_seq_lens, logits_indices, offset = [], [], [], 0
        for i, (q, s, table) in enumerate(zip(query_lens, seq_lens, block_tables)):
            for pos in range(s - q, s):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            token_seq_lens.extend([s] * q)
            offset += q
            if sample is None or sample[i]:
                logits_indices.append(offset - 1)

        def tensor(values):
            return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

        return cls(
            query_lens=list(query_lens),
            seq_lens=list(seq_lens),
            block_tables=block_tables,
            block_size=block_size,
            slot_mapping=tensor(slots),
            token_seq_lens=tensor(token_seq_lens),
            logits_indices=tensor(logits_indices),
        )

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.numel()


def allocate_kv_cache(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair per layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]


@dataclass
class _Group:
    """Sequences attended together in one padded SDPA call (padding lives only inside the kernel call)."""

    token_index: torch.Tensor  # [G, max_q] long: flat token of each query row (0 where padded)
    token_valid: torch.Tensor  # [G, max_q] bool
    block_tables: torch.Tensor  # [G, max_blocks] long: each sequence's cache blocks (0 where padded)
    mask: torch.Tensor  # [G, 1, max_q * queries_per_kv, max_blocks * block_size] bool: True = may attend


# Decodes are bucketed by context length so that short contexts are not padded to the longest:
# a new bucket starts when a context exceeds the bucket's shortest by this factor.
DECODE_BUCKET_RATIO = 1.5


class TorchAttentionBackend:
    """Reference backend in plain torch (CPU and GPU). Decodes of similar context length share one
    SDPA call; each prefill chunk gets its own, so a long prompt never pads the decodes to its length.
    K/V are gathered a whole block at a time: contiguous copies of block_size tokens."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.queries_per_kv = num_heads // num_kv_heads
        self.head_dim = head_dim

    def plan(self, meta: AttentionMetadata) -> list[_Group]:
        """Index tensors shared by every layer of one forward."""
        starts, offset = [], 0
        for q in meta.query_lens:
            starts.append(offset)
            offset += q
        prefills = [[i] for i, q in enumerate(meta.query_lens) if q > 1]
        buckets: list[list[int]] = []  # decodes, shortest context first
        for i in sorted((i for i, q in enumerate(meta.query_lens) if q == 1), key=meta.seq_lens.__getitem__):
            if not buckets or meta.seq_lens[i] > DECODE_BUCKET_RATIO * meta.seq_lens[buckets[-1][0]]:
                buckets.append([])
            buckets[-1].append(i)
        device = meta.slot_mapping.device
        return [self._group(meta, members, starts, device) for members in prefills + buckets]

    def _group(self, meta: AttentionMetadata, members: list[int], starts: list[int], device) -> _Group:
        bs = meta.block_size
        max_q = max(meta.query_lens[i] for i in members)
        max_blocks = max((meta.seq_lens[i] + bs - 1) // bs for i in members)
        q_range = torch.arange(max_q)
        ctx_range = torch.arange(max_blocks * bs)
        query_lens = torch.tensor([meta.query_lens[i] for i in members])
        seq_lens = torch.tensor([meta.seq_lens[i] for i in members])
        token_valid = q_range[None, :] < query_lens[:, None]  # [G, max_q]
        token_index = torch.where(token_valid, torch.tensor([starts[i] for i in members])[:, None] + q_range, 0)
        # Query row r of a sequence sits at absolute position seq_len - query_len + r (causal limit);
        # that also hides the unused tail of its last block and padded blocks.
        last_visible = (seq_lens - query_lens)[:, None] + q_range[None, :]  # [G, max_q]
        mask = ctx_range[None, None, :] <= last_visible[:, :, None]  # [G, max_q, max_ctx]
        mask = mask.repeat_interleave(self.queries_per_kv, dim=1)[:, None]
        tables = torch.zeros(len(members), max_blocks, dtype=torch.long)
        for row, i in enumerate(members):
            blocks = meta.block_tables[i][: (meta.seq_lens[i] + bs - 1) // bs]
            tables[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        return _Group(*(t.to(device, non_blocking=True) for t in (token_index, token_valid, tables, mask)))

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        plan: list[_Group],
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        k_flat = kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)  # [num_slots, num_kv_heads, head_dim]
        v_flat = kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        for g in plan:
            num_seqs, max_q = g.token_index.shape
            # Stack each KV head's query heads along the query axis: no K/V repetition for GQA.
            qg = q[g.token_index].view(num_seqs, max_q, self.num_kv_heads, self.queries_per_kv, self.head_dim)
            qg = qg.permute(0, 2, 1, 3, 4).reshape(num_seqs, self.num_kv_heads, -1, self.head_dim)
            kg, vg = (self._gather(cache, g.block_tables) for cache in kv_cache)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask)
            og = og.view(num_seqs, self.num_kv_heads, max_q, self.queries_per_kv, self.head_dim)
            og = og.permute(0, 2, 1, 3, 4).reshape(num_seqs, max_q, self.num_heads, self.head_dim)
            out[g.token_index[g.token_valid]] = og[g.token_valid]
        return out.view(q.shape[0], -1)

    def _gather(self, cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """[G, num_kv_heads, max_blocks * block_size, head_dim]: each sequence's cached K (or V) in order.
        index_select copies whole blocks; advanced indexing (cache[tables]) was 3-5x slower on CPU."""
        num_seqs, max_blocks = block_tables.shape
        blocks = cache.index_select(0, block_tables.view(-1))  # [G * max_blocks, block_size, kv_heads, head_dim]
        return blocks.view(num_seqs, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
