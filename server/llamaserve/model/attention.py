"""Paged attention: per-step metadata for a flat batch of many sequences, and the backends behind one call.

A step's tokens are flat ([num_tokens]): each sequence contributes `query_len` new tokens (a prefill
chunk or one decode token) whose K/V are written into cache slots, then attend over the sequence's
whole context (cached tokens + new ones) through its block table. No sequence is padded to another's
length on the way in or out.

Backends share one interface (AttentionBackend): `plan(meta)` once per forward, `forward(...)` per layer.
The torch backend here runs everywhere and is the oracle the others are tested against; the Triton
kernels (triton_attention) and FlashInfer (flashinfer_attention) serve CUDA devices.
"""

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ATTENTION_BACKENDS
from .staging import StagingBuffer

log = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    query_lens: list[int]  # new tokens per sequence this step
    seq_lens: list[int]  # tokens per sequence once this step's are in the cache (context + new)
    block_tables: list[list[int]]  # per sequence, the cache blocks that hold its tokens in order
    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] long: cache slot (block * block_size + offset) of each new token
    token_seq_lens: torch.Tensor  # [num_tokens] long: seq_len of each token's sequence (dynamic RoPE)
    logits_indices: torch.Tensor  # [num_sampled] long: flat positions whose logits are wanted
    # The same layout as device tensors, for kernels that read it themselves:
    query_start_loc: torch.Tensor  # [num_seqs + 1] long: each sequence's first flat token; last = num_tokens
    seq_lens_tensor: torch.Tensor  # [num_seqs] long
    block_table: torch.Tensor  # [num_seqs, max_blocks] long: blocks in use, padded with 0 (never read)
    decode_seqs: torch.Tensor  # [num_decodes] long: sequences with one new token
    prefill_seqs: torch.Tensor  # [num_prefills] long: sequences with several (a prefill chunk)

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
        """`sample[i]` says whether sequence i wants the logits of its last new token (default: all do).
        Computed on the host (step_layout), then copied to `device` in one transfer."""
        staging = StagingBuffer(device, capacity=1 << 12).begin()
        staged = StagedMetadata(query_lens, seq_lens, block_tables, block_size, sample, staging)
        staging.send()
        return staged.on_device()

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.numel()


# The AttentionMetadata fields that step_layout computes, in its order.
DEVICE_FIELDS = ("slot_mapping", "token_seq_lens", "logits_indices", "query_start_loc", "seq_lens_tensor",
                 "block_table", "decode_seqs", "prefill_seqs")


def step_layout(query_lens, seq_lens, block_tables, block_size: int, sample=None) -> dict[str, np.ndarray]:
    """The flat int64 indices of one step, computed once on the host with numpy (no loop per token): each
    token's position, plus the DEVICE_FIELDS of AttentionMetadata. `block_tables`: one row per sequence (a list,
    or a row of a 2-D array) holding at least its ceil(seq_len / block_size) blocks."""
    q = np.asarray(query_lens, dtype=np.int64)  # [num_seqs]
    s = np.asarray(seq_lens, dtype=np.int64)
    num_seqs = len(q)
    ends = np.cumsum(q)
    starts = ends - q
    token_seq = np.repeat(np.arange(num_seqs), q)  # [num_tokens]: each token's sequence
    num_tokens = len(token_seq)
    positions = (s - q - starts)[token_seq] + np.arange(num_tokens)  # [num_tokens] position in its sequence
    blocks_used = -(-s // block_size)
    table = np.zeros((num_seqs, int(blocks_used.max(initial=0))), dtype=np.int64)  # [num_seqs, max_blocks]
    for row, (blocks, n) in enumerate(zip(block_tables, blocks_used.tolist())):
        table[row, :n] = blocks[:n]
    wanted = np.ones(num_seqs, dtype=bool) if sample is None else np.asarray(sample, dtype=bool)
    return {
        "positions": positions,
        "slot_mapping": table[token_seq, positions // block_size] * block_size + positions % block_size,
        "token_seq_lens": s[token_seq],
        "logits_indices": (ends - 1)[wanted],
        "query_start_loc": np.concatenate([np.zeros(1, dtype=np.int64), ends]),
        "seq_lens_tensor": s,
        "block_table": table,
        "decode_seqs": np.flatnonzero(q == 1),
        "prefill_seqs": np.flatnonzero(q > 1),
    }


class StagedMetadata:
    """One step's layout staged into a StagingBuffer (with the tokens' positions); `on_device()` after the send."""

    def __init__(self, query_lens, seq_lens, block_tables, block_size: int, sample, staging: StagingBuffer):
        self.query_lens, self.seq_lens, self.block_tables = list(query_lens), list(seq_lens), block_tables
        self.block_size = block_size
        self.fields = {name: staging.put(values) for name, values in
                       step_layout(query_lens, seq_lens, block_tables, block_size, sample).items()}

    @property
    def positions(self) -> torch.Tensor:
        return self.fields["positions"].tensor()

    def on_device(self) -> AttentionMetadata:
        return AttentionMetadata(self.query_lens, self.seq_lens, self.block_tables, self.block_size,
                                 **{name: self.fields[name].tensor() for name in DEVICE_FIELDS})


class AttentionBackend(Protocol):
    """Paged attention for one model: `plan` once per forward builds what every layer shares (index tensors,
    launch sizes); `forward` per layer writes the step's new K/V into that layer's cache, then attends."""

    name: str

    def plan(self, meta: AttentionMetadata) -> Any: ...

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        plan: Any,
    ) -> torch.Tensor: ...  # [num_tokens, num_heads * head_dim]


def select_attention_backend(
    name: str, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
    cpu_kernel=None,
) -> AttentionBackend:
    """`name`: one of ATTENTION_BACKENDS. "auto" on CUDA: FlashInfer where it is installed and serves the
    shape (the Triton kernels if it then fails to start), else the Triton kernels; on CPU, llamaserve's kernel
    (`cpu_kernel`, a cpu_kernels.PagedAttention) where it is given and serves the shape; elsewhere the torch
    backend. An explicit name that cannot serve raises ValueError."""
    from .flashinfer_attention import flashinfer_unsupported

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, not {name!r}")
    device = torch.device(device)
    heads = (num_heads, num_kv_heads, head_dim)
    has_triton = importlib.util.find_spec("triton") is not None
    if name == "auto":
        if device.type == "cpu" and cpu_kernel is not None and cpu_kernel.supports(dtype, *heads):
            return CpuAttentionBackend(cpu_kernel, *heads)
        if device.type != "cuda":
            return TorchAttentionBackend(*heads)
        if flashinfer_unsupported(device, dtype, head_dim) is None:
            try:
                return _flashinfer(*heads, device, dtype)
            except Exception as e:  # installed but broken (a CUDA or torch ABI mismatch): serve on
                log.warning("FlashInfer is installed but did not start (%s); using the next backend", e)
        name = "triton" if has_triton else "torch"
    if name == "torch":
        return TorchAttentionBackend(*heads)
    if name == "triton":
        if not has_triton:
            raise ValueError("the triton attention backend needs the triton package")
        from .triton_attention import TritonAttentionBackend

        return TritonAttentionBackend(*heads, device)
    reason = flashinfer_unsupported(device, dtype, head_dim)
    if reason is not None:
        raise ValueError(f"the flashinfer attention backend cannot serve: {reason}")
    return _flashinfer(*heads, device, dtype)


def _flashinfer(num_heads, num_kv_heads, head_dim, device, dtype) -> AttentionBackend:
    from .flashinfer_attention import FlashInferAttentionBackend

    return FlashInferAttentionBackend(num_heads, num_kv_heads, head_dim, device, dtype)


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
    rows: torch.Tensor  # [n] long: the query rows (of G * max_q) that are real tokens
    dest: torch.Tensor  # [n] long: the flat token each of those rows is
    block_tables: torch.Tensor  # [G, max_blocks] long: each sequence's cache blocks (0 where padded)
    mask: torch.Tensor | None  # [G, 1, max_q * queries_per_kv, max_blocks * block_size] bool: True = may attend
    decode: bool = False  # one new token per sequence: no query padding, rows are the sequences
    context: int | None = None  # a lone decode's seq_len: K/V cut to it, so no mask at all
    whole_step: bool = False  # a decode group of every token of the step in order: no gather or scatter of q
    block_range: tuple[int, int] | None = None  # a lone sequence's blocks when consecutive: K/V read in place


# Decodes are bucketed by context length so that short contexts are not padded to the longest:
# a new bucket starts when a context exceeds the bucket's shortest by this factor.
DECODE_BUCKET_RATIO = 1.5


class TorchAttentionBackend:
    """Reference backend in plain torch (CPU and GPU), and the oracle the others are tested against.
    Decodes of similar context length share one SDPA call; each prefill chunk gets its own, so a long
    prompt never pads the decodes to its length. K/V are gathered a whole block at a time: contiguous copies of block_size tokens."""

    name = "torch"

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
        groups = [self._group(meta, members, starts, device) for members in prefills + buckets]
        if len(groups) == 1 and not prefills and buckets[0] == sorted(buckets[0]):
            groups[0].whole_step = True  # batch 1, or decodes already in context order
        return groups

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
        # Where the valid rows go, found here on the host: a boolean index on the device would sync.
        rows = token_valid.view(-1).nonzero().view(-1)
        dest = token_index.view(-1)[rows]
        group = _Group(*(t.to(device, non_blocking=True) for t in (token_index, rows, dest, tables, mask)))
        group.decode = max_q == 1
        if len(members) == 1:
            blocks = meta.block_tables[members[0]][:max_blocks]
            if all(b == blocks[0] + i for i, b in enumerate(blocks)):  # a view of the cache, not a copy
                group.block_range = (blocks[0], blocks[0] + max_blocks)
            if group.decode:  # K/V cut to the context instead of masked
                group.context, group.mask = meta.seq_lens[members[0]], None
        return group

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
        out = None if plan[0].whole_step else torch.empty_like(q)
        for g in plan:
            if g.decode:  # fewer copies and index ops: one query row per sequence
                og = self._decode(q, kv_cache, g)  # [G, num_heads, head_dim]
                if g.whole_step:
                    return og.view(q.shape[0], -1)
                out[g.dest] = og
                continue
            out[g.dest] = self._prefill(q, kv_cache, g)
        return out.view(q.shape[0], -1)

    def _prefill(self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], g: _Group) -> torch.Tensor:
        """One group with prefill chunks: [tokens of the group, num_heads, head_dim], in g.dest order."""
        num_seqs, max_q = g.token_index.shape
        # Stack each KV head's query heads along the query axis: no K/V repetition for GQA.
        qg = q[g.token_index].view(num_seqs, max_q, self.num_kv_heads, self.queries_per_kv, self.head_dim)
        qg = qg.permute(0, 2, 1, 3, 4).reshape(num_seqs, self.num_kv_heads, -1, self.head_dim)
        kg, vg = (self._gather(cache, g) for cache in kv_cache)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask)
        og = og.view(num_seqs, self.num_kv_heads, max_q, self.queries_per_kv, self.head_dim)
        return og.permute(0, 2, 1, 3, 4).reshape(num_seqs * max_q, self.num_heads, self.head_dim)[g.rows]

    def _decode(self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], g: _Group) -> torch.Tensor:
        """One decode group: [G, num_heads, head_dim]. Each KV head's query heads stack as its query rows
        (no K/V repetition for GQA); with one token a sequence that is a view of q, not a permuted copy."""
        num_seqs = g.block_tables.shape[0]
        qg = (q if g.whole_step else q[g.dest]).reshape(num_seqs, self.num_kv_heads, self.queries_per_kv,
                                                          self.head_dim)
        kg, vg = (self._gather(cache, g) for cache in kv_cache)
        if g.context is not None:
            kg, vg = kg[:, :, : g.context], vg[:, :, : g.context]
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask)  # [G, kv_heads, queries_per_kv, head_dim]
        return og.reshape(num_seqs, self.num_heads, self.head_dim)

    def _gather(self, cache: torch.Tensor, g: _Group) -> torch.Tensor:
        """[G, num_kv_heads, max_blocks * block_size, head_dim]: each sequence's cached K (or V) in order.
        A lone sequence on consecutive blocks reads them in place (at 4,096 tokens the copy was 2 MiB per
        layer and tensor, as much as its weights in int4); otherwise index_select copies whole blocks
        (advanced indexing, cache[tables], was 3-5x slower on CPU)."""
        num_seqs, max_blocks = g.block_tables.shape
        if g.block_range is not None:
            blocks = cache[g.block_range[0] : g.block_range[1]]  # [max_blocks, block_size, kv_heads, head_dim]
        else:
            blocks = cache.index_select(0, g.block_tables.view(-1))  # [G * max_blocks, block_size, ...]
        return blocks.view(num_seqs, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)


@dataclass
class _CpuPlan:
    prefills: list[_Group]  # one per prefill chunk, through the torch backend's path
    decode_tokens: torch.Tensor  # [num_decodes] long: the flat token of each decoding sequence
    decode_tables: torch.Tensor  # [num_decodes, max_blocks] long: their block tables
    decode_lens: torch.Tensor  # [num_decodes] long: their seq_lens


class CpuAttentionBackend(TorchAttentionBackend):
    """The torch backend with the cache writes and every decode token in llamaserve's C kernel
    (cpu_kernels.PagedAttention): one call a layer for all the step's decodes, whatever their contexts, where
    the torch path runs a dozen operators per decode bucket. Prefill chunks take the torch path."""

    name = "cpu"

    def __init__(self, kernel, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__(num_heads, num_kv_heads, head_dim)
        self.kernel = kernel  # cpu_kernels.PagedAttention

    def plan(self, meta: AttentionMetadata) -> _CpuPlan:
        starts = np.concatenate([[0], np.cumsum(meta.query_lens)[:-1]]).astype(np.int64)
        prefills = [self._group(meta, [i], starts.tolist(), "cpu") for i, q in enumerate(meta.query_lens) if q > 1]
        decodes = meta.decode_seqs
        return _CpuPlan(prefills, torch.from_numpy(starts)[decodes], meta.block_table[decodes].contiguous(),
                        meta.seq_lens_tensor[decodes].contiguous())

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, plan: _CpuPlan) -> torch.Tensor:
        self.kernel.write_kv(k, v, meta.slot_mapping, kv_cache)
        out = torch.empty(q.shape[0], self.num_heads * self.head_dim, dtype=q.dtype)
        if plan.decode_tokens.numel():
            self.kernel.decode(q, kv_cache, plan.decode_tokens, plan.decode_tables, plan.decode_lens, out)
        for g in plan.prefills:
            out.view_as(q)[g.dest] = self._prefill(q, kv_cache, g)
        return out
