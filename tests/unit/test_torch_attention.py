"""The torch attention backend against attention written out per sequence: decode groups (the whole step in order,
scattered, a lone sequence on consecutive blocks read in place or on scattered blocks gathered) and prefill chunks."""

import pytest
import torch

from llamaserve.model.attention import AttentionMetadata, TorchAttentionBackend

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 16, 4


def reference(q, k_cache, v_cache, meta):
    """Each sequence's queries over its own context, causal, GQA by repeating K/V: [num_tokens, heads * dim]."""
    out, start = [], 0
    for query_len, seq_len, blocks in zip(meta.query_lens, meta.seq_lens, meta.block_tables):
        slots = torch.tensor([blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len)])
        k = k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots].repeat_interleave(HEADS // KV_HEADS, 1)  # [ctx, H, D]
        v = v_cache.view(-1, KV_HEADS, HEAD_DIM)[slots].repeat_interleave(HEADS // KV_HEADS, 1)
        qs = q[start : start + query_len]  # [query_len, H, D]
        scores = torch.einsum("qhd,khd->hqk", qs, k) / HEAD_DIM**0.5
        visible = torch.arange(seq_len)[None, :] <= (seq_len - query_len + torch.arange(query_len))[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", probs, v).reshape(query_len, -1))
        start += query_len
    return torch.cat(out)


@pytest.mark.parametrize("query_lens, seq_lens, block_tables", [
    ([1], [9], [[3, 4, 5]]),  # a lone decode on consecutive blocks: K/V read in place
    ([1], [9], [[5, 0, 3]]),  # on scattered blocks: gathered
    ([1, 1, 1], [5, 6, 7], [[0, 1], [2, 3], [4, 5]]),  # the whole step, already in context order
    ([1, 1, 1], [7, 5, 6], [[4, 5], [0, 1], [2, 3]]),  # one group, out of order: scattered back
    ([1, 1], [3, 30], [[0], [1, 2, 3, 4, 5, 6, 7, 8]]),  # two buckets
    ([1, 5, 1], [6, 9, 2], [[0, 1], [2, 3, 4], [5]]),  # a prefill chunk between decodes
])
def test_matches_attention_written_out(query_lens, seq_lens, block_tables):
    torch.manual_seed(0)
    num_tokens = sum(query_lens)
    k_cache, v_cache = (torch.randn(10, BLOCK, KV_HEADS, HEAD_DIM) for _ in range(2))
    q = torch.randn(num_tokens, HEADS, HEAD_DIM)
    k, v = (torch.randn(num_tokens, KV_HEADS, HEAD_DIM) for _ in range(2))
    meta = AttentionMetadata.build(query_lens, seq_lens, block_tables, BLOCK)
    backend = TorchAttentionBackend(HEADS, KV_HEADS, HEAD_DIM)
    out = backend.forward(q, k, v, (k_cache, v_cache), meta, backend.plan(meta))  # writes k, v into the caches
    torch.testing.assert_close(out, reference(q, k_cache, v_cache, meta), rtol=1e-5, atol=1e-5)
