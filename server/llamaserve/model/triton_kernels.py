"""Triton kernels for the paged KV cache: the fused cache write, decode (split-K), and prefill chunks.

The cache is [num_blocks, block_size, num_kv_heads, head_dim] per layer for K and V. A sequence's token
at position p lives in block `block_table[seq, p // block_size]` at offset p % block_size. Each program
serves one KV head and all the query heads that share it (GQA inside the kernel: K/V are read once per
group, never repeated). Scores and sums are float32; softmax uses exp2 with log2(e) folded into the scale.
tl.dot needs every dimension >= 16, so small query groups and head dims are padded with masked lanes.
Its operands are DOT_DTYPE: the cache's dtype on a GPU (bfloat16 tensor cores); float32 under the
interpreter, whose dot multiplies bfloat16 bit patterns as integers (Triton 3.9).
Written against Triton 3.6's language (the GPU machines); the CPU tests run them under TRITON_INTERPRET=1.
"""

import triton
import triton.language as tl


@triton.jit
def cache_write_kernel(
    k_ptr, v_ptr,  # [num_tokens, num_kv_heads, head_dim], any token/head strides
    k_cache_ptr, v_cache_ptr,  # [num_blocks * block_size, num_kv_heads, head_dim] contiguous
    slot_ptr,  # [num_tokens]: flat cache slot of each token; < 0 = skip (a padded token)
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, HEAD_DIM_P2)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    dest = slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
    k = tl.load(k_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(k_cache_ptr + dest, k, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(v_cache_ptr + dest, v, mask=mask)


@triton.jit
def _attend_tile(
    q, m, l, acc,  # [ROWS, HEAD_DIM_P2] queries; running max, sum [ROWS]; unnormalised output [ROWS, HEAD_DIM_P2]
    k_cache_ptr, v_cache_ptr, table_row_ptr, kv_head, start, end, row_limit, scale,
    stride_cb, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over context positions [start, start + BLOCK_N) that are < end and, per query
    row, <= row_limit (the causal bound; [ROWS]). Every row must see at least one position over the whole
    loop's first tile, so that its running max is finite before a fully masked tile arrives."""
    pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] context positions
    valid = pos < end
    d = tl.arange(0, HEAD_DIM_P2)
    kv_mask = valid[:, None] & (d[None, :] < HEAD_DIM)
    block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    offset = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch  # [BLOCK_N]
    k = tl.load(k_cache_ptr + offset[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, HEAD_DIM_P2]
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * scale  # [ROWS, BLOCK_N]
    s = tl.where(valid[None, :] & (pos[None, :] <= row_limit[:, None]), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    v = tl.load(v_cache_ptr + offset[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, HEAD_DIM_P2]
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return m_new, l * alpha + tl.sum(p, 1), acc


@triton.jit
def decode_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]: written when not SPLIT
    part_out_ptr, part_max_ptr, part_sum_ptr,  # [num_decodes, num_heads, num_splits(, head_dim)] float32
    q_ptr, k_cache_ptr, v_cache_ptr,
    block_table_ptr, seq_lens_ptr, query_start_ptr, decode_seqs_ptr,
    scale, partition_size, num_splits,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
    NUM_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr, GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (num_decodes, num_kv_heads, num_splits): one new token's query heads of one KV head over one
    partition of its context (the whole context when not SPLIT). The split count is a runtime value, so
    that a new count does not compile a new kernel."""
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(decode_seqs_ptr + i)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)  # positions are int32, addresses int64
    token = tl.load(query_start_ptr + seq)
    g = tl.arange(0, GROUP_P2)
    heads = kv_head * QUERIES_PER_KV + g  # [GROUP_P2]
    d = tl.arange(0, HEAD_DIM_P2)
    row_mask = g < QUERIES_PER_KV
    q_mask = row_mask[:, None] & (d[None, :] < HEAD_DIM)
    q_offset = token * stride_qt + heads * stride_qh  # [GROUP_P2]
    q = tl.load(q_ptr + q_offset[:, None] + d[None, :], mask=q_mask, other=0.0).to(DOT_DTYPE)
    m = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM_P2], tl.float32)
    start = split * partition_size
    end = tl.minimum(seq_len, start + partition_size)
    limit = seq_len + tl.zeros([GROUP_P2], tl.int32)  # a decode token sees its whole context
    table_row = block_table_ptr + seq * stride_bt
    for n in range(start, end, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, n, end, limit, scale,
                                 stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_P2,
                                 DOT_DTYPE, DOT_PRECISION)
    if not SPLIT:
        out = acc / l[:, None]
        tl.store(out_ptr + token * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # An empty partition (start >= seq_len) leaves max -inf and sum 0: the reduce weighs it 0.
        part = (i * NUM_HEADS + heads) * num_splits + split  # [GROUP_P2]
        tl.store(part_max_ptr + part, m, mask=row_mask)
        tl.store(part_sum_ptr + part, l, mask=row_mask)
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=q_mask)


@triton.jit
def decode_reduce_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, query_start_ptr, decode_seqs_ptr,
    num_splits, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, SPLITS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
):
    """Grid (num_decodes, num_heads): combine the partitions' (max, sum, output) into the softmax over all."""
    i = tl.program_id(0)
    head = tl.program_id(1)
    token = tl.load(query_start_ptr + tl.load(decode_seqs_ptr + i))
    s = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, HEAD_DIM_P2)
    part = (i * NUM_HEADS + head) * num_splits + s  # [SPLITS_P2]
    split_mask = s < num_splits
    m = tl.load(part_max_ptr + part, mask=split_mask, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=split_mask, other=0.0)
    acc = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :],
                  mask=split_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)  # [SPLITS_P2, HEAD_DIM_P2]
    weight = tl.exp2(m - tl.max(m, 0))  # partition 0 is never empty, so the max is finite
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(l * weight, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def prefill_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    block_table_ptr, seq_lens_ptr, query_start_ptr, prefill_seqs_ptr,
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
    QUERIES_PER_KV: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (num_prefills, num_kv_heads, cdiv(max_query_len, BLOCK_Q)): BLOCK_Q new tokens of one chunk x the
    query heads of one KV head (BLOCK_Q * GROUP_P2 rows), causally over the cached context and the chunk."""
    i = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2)
    seq = tl.load(prefill_seqs_ptr + i)
    q_start = tl.load(query_start_ptr + seq)
    q_len = (tl.load(query_start_ptr + seq + 1) - q_start).to(tl.int32)  # positions are int32, addresses int64
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    context_len = seq_len - q_len  # tokens cached before this chunk
    rows = tl.arange(0, BLOCK_Q * GROUP_P2)
    q_index = q_block * BLOCK_Q + rows // GROUP_P2  # [ROWS] new token within the chunk
    g = rows % GROUP_P2
    heads = kv_head * QUERIES_PER_KV + g
    d = tl.arange(0, HEAD_DIM_P2)
    row_mask = (q_index < q_len) & (g < QUERIES_PER_KV)
    q_mask = row_mask[:, None] & (d[None, :] < HEAD_DIM)
    q_offset = (q_start + q_index) * stride_qt + heads * stride_qh  # [ROWS]
    q = tl.load(q_ptr + q_offset[:, None] + d[None, :], mask=q_mask, other=0.0).to(DOT_DTYPE)
    # Masked rows keep a limit >= 0, so position 0 keeps their running max finite too.
    limit = context_len + q_index  # [ROWS] last position each row may see
    end = tl.minimum(seq_len, context_len + (q_block + 1) * BLOCK_Q)  # past the block's last query: nothing
    m = tl.full([BLOCK_Q * GROUP_P2], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q * GROUP_P2], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P2, HEAD_DIM_P2], tl.float32)
    table_row = block_table_ptr + seq * stride_bt
    for n in range(0, end, BLOCK_N):
        m, l, acc = _attend_tile(q, m, l, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, n, end, limit, scale,
                                 stride_cb, stride_cs, stride_ch, BLOCK_SIZE, BLOCK_N, HEAD_DIM, HEAD_DIM_P2,
                                 DOT_DTYPE, DOT_PRECISION)
    out = acc / l[:, None]
    o_offset = (q_start + q_index) * stride_ot + heads * stride_oh
    tl.store(out_ptr + o_offset[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)
