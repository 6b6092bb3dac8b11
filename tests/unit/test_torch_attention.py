"""The torch attention backend, and the CPU backend on llamaserve's decode kernel, against attention written out per
sequence: decode groups (the whole step in order, scattered, a lone sequence on consecutive blocks read in place or
on scattered blocks gathered) and prefill chunks; the kernel also in bfloat16, on q/k/v that are views of one fused
projection, with grouped-query attention up to 8 query heads a KV head; and the kernel alone over contexts of several
of its softmax chunks, odd block sizes and head dims, giving a sequence the same bits in any batch on any threads."""

import pytest
import torch

from llamaserve.model.attention import AttentionMetadata, CpuAttentionBackend, TorchAttentionBackend
from llamaserve.model.cpu_kernels import paged_attention
from tests.conftest import built_kernel

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
@pytest.mark.parametrize("backend_name", ["torch", "cpu"])
def test_matches_attention_written_out(query_lens, seq_lens, block_tables, backend_name, tmp_path):
    torch.manual_seed(0)
    num_tokens = sum(query_lens)
    k_cache, v_cache = (torch.randn(10, BLOCK, KV_HEADS, HEAD_DIM) for _ in range(2))
    q = torch.randn(num_tokens, HEADS, HEAD_DIM)
    k, v = (torch.randn(num_tokens, KV_HEADS, HEAD_DIM) for _ in range(2))
    meta = AttentionMetadata.build(query_lens, seq_lens, block_tables, BLOCK)
    backend = make_backend(backend_name, tmp_path)
    out = backend.forward(q, k, v, (k_cache, v_cache), meta, backend.plan(meta))  # writes k, v into the caches
    torch.testing.assert_close(out, reference(q, k_cache, v_cache, meta), rtol=1e-5, atol=1e-5)


def make_backend(name: str, cache_dir, heads: int = HEADS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM):
    if name == "torch":
        return TorchAttentionBackend(heads, kv_heads, head_dim)
    return CpuAttentionBackend(built_kernel(paged_attention, cache_dir), heads, kv_heads, head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 1, 32), (4, 4, 128)])
def test_the_cpu_kernel_on_views_of_a_fused_projection(tmp_path, dtype, heads, kv_heads, head_dim):
    """A step as the model runs it: q, k, v cut from one [tokens, heads + 2 kv_heads, head_dim] tensor, decodes
    of many context lengths (one call) around a prefill chunk, in float32 and bfloat16, against the torch
    backend on the same inputs (bfloat16: within its rounding; the kernel keeps the probabilities in float32)."""
    torch.manual_seed(heads + head_dim)
    query_lens, seq_lens = [1, 1, 7, 1, 1], [1, 40, 12, 17, 130]
    tables = [[9], [3, 14, 0], [5, 6, 7], [1, 2], [15, 16, 17, 18, 19, 20, 21, 22, 23]]
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, 16)
    caches = [tuple(torch.randn(24, 16, kv_heads, head_dim).to(dtype) for _ in range(2)) for _ in range(2)]
    caches[1] = tuple(c.clone() for c in caches[0])
    fused = torch.randn(sum(query_lens), heads + 2 * kv_heads, head_dim).to(dtype)
    q, k, v = fused[:, :heads], fused[:, heads : heads + kv_heads], fused[:, heads + kv_heads :]
    outs = []
    for name, cache in zip(("torch", "cpu"), caches):
        backend = make_backend(name, tmp_path, heads, kv_heads, head_dim)
        outs.append(backend.forward(q, k, v, cache, meta, backend.plan(meta)))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])  # the same writes
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=tolerance, atol=tolerance)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return built_kernel(paged_attention, tmp_path_factory.mktemp("cache"))


def decode_inputs(dtype, heads, kv_heads, head_dim, block_size, contexts, seed=0):
    """q [seqs, heads, head_dim] (rows strided, as cut from a fused projection), a (K, V) cache and each
    sequence's blocks, scattered: keys shrink along the context in even sequences and grow in odd ones, so
    that the kernel's running max stays put from chunk to chunk in some and rises in others."""
    torch.manual_seed(seed)
    per = [-(-c // block_size) for c in contexts]
    tables = torch.randperm(sum(per)).split(per)
    tables = torch.stack([torch.cat([t, t.new_zeros(max(per) - len(t))]) for t in tables])  # [seqs, max_blocks]
    k_cache, v_cache = (torch.randn(sum(per), block_size, kv_heads, head_dim) for _ in range(2))
    for s, context in enumerate(contexts):
        ramp = torch.linspace(3, 0.2, context) if s % 2 == 0 else torch.linspace(0.2, 3, context)
        k_cache.view(-1, kv_heads, head_dim)[slots_of(tables[s], context, block_size)] *= ramp[:, None, None]
    q = torch.randn(len(contexts), heads + 2 * kv_heads, head_dim)[:, :heads]
    return q.to(dtype), (k_cache.to(dtype), v_cache.to(dtype)), tables, torch.tensor(contexts)


def slots_of(table, context: int, block_size: int) -> torch.Tensor:  # [context] cache slots of a sequence's tokens
    return torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(context)])


def decode(kernel, q, cache, tables, seq_lens):
    out = torch.empty(q.shape[0], q.shape[1] * q.shape[2], dtype=q.dtype)
    kernel.decode(q, cache, torch.arange(q.shape[0]), tables.contiguous(), seq_lens, out)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim, block_size, contexts", [
    (9, 3, 64, 16, [1000, 700, 1, 16, 33]),  # several of the kernel's 256-token chunks, the last partial
    (8, 1, 256, 7, [300, 260, 5]),  # the largest group and head_dim, blocks of 7
    (6, 2, 48, 5, [270, 40, 17]),  # head_dim % 32 == 16 (bfloat16 multiplies 32 dims at a time)
])
def test_the_decode_kernel_over_long_contexts_and_any_block_size(kernel, dtype, heads, kv_heads, head_dim,
                                                                   block_size, contexts):
    q, (k_cache, v_cache), tables, seq_lens = decode_inputs(dtype, heads, kv_heads, head_dim, block_size, contexts)
    out = decode(kernel, q, (k_cache, v_cache), tables, seq_lens)
    for s, context in enumerate(contexts):  # in float64, from the same (rounded) inputs
        slots = slots_of(tables[s], context, block_size)
        k, v = (c.double().view(-1, kv_heads, head_dim)[slots].repeat_interleave(heads // kv_heads, 1)
                for c in (k_cache, v_cache))  # [context, heads, head_dim]
        probs = (torch.einsum("hd,khd->hk", q[s].double(), k) / head_dim**0.5).softmax(-1)
        expected = torch.einsum("hk,khd->hd", probs, v).reshape(-1)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[s].double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decode_kernel_gives_a_sequence_the_same_bits_alone_in_any_batch_on_any_threads(kernel, dtype):
    q, cache, tables, seq_lens = decode_inputs(dtype, 9, 3, 64, 16, [300, 290, 7, 600, 129])
    batch = decode(kernel, q, cache, tables, seq_lens)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = decode(kernel, q, cache, tables, seq_lens)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, batch)
    for s in range(len(seq_lens)):
        alone = decode(kernel, q[s : s + 1], cache, tables[s : s + 1], seq_lens[s : s + 1])
        assert torch.equal(alone, batch[s : s + 1])
