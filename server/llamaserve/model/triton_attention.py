"""The Triton attention backend: the fused K/V cache write, then at most three launches per layer.

Decodes (one new token) go to the decode kernel, split along the context when there are too few
(sequence, KV head) programs to fill the device; prefill chunks go to the prefill kernel, all in one
launch whatever their lengths. Launch sizes come from the metadata's host lists (never from a device
read); the index tensors come from the metadata's one host-to-device copy per step.
"""

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention import AttentionMetadata
from .triton_kernels import cache_write_kernel, decode_kernel, decode_reduce_kernel, prefill_kernel

# Decode tiles: positions per inner step, and the shortest partition worth its own program when splitting.
DECODE_BLOCK_N = 32
MIN_PARTITION = 256
# Prefill tiles: query rows per program (tokens x heads of one group), context positions per inner step.
PREFILL_ROWS = 64
PREFILL_BLOCK_N = 32
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(n))


@dataclass
class TritonPlan:
    num_decodes: int
    num_prefills: int
    max_prefill_len: int  # longest prefill chunk (new tokens)
    num_splits: int  # decode context partitions; 1: no split, no reduce
    partition_size: int  # context positions per partition, a multiple of DECODE_BLOCK_N
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # split-K scratch, shared by every layer


class TritonAttentionBackend:
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device,
                 partition_size: int | None = None):
        """`partition_size` fixes the decode split (tests); None chooses it per step from the batch."""
        device = torch.device(device)
        self.interpreting = getattr(getattr(getattr(triton, "knobs", None), "runtime", None), "interpret", False)
        if device.type != "cuda" and not self.interpreting:
            raise ValueError("the triton attention backend runs on CUDA devices (on the CPU only through "
                             "Triton's interpreter, TRITON_INTERPRET=1, as the tests do)")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.queries_per_kv = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.scale = math.log2(math.e) / math.sqrt(head_dim)  # softmax in base 2
        self.partition_size = partition_size
        # Enough programs to fill every SM a few times over; below that, decodes split their contexts.
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.target_programs = 4 * sms

    def plan(self, meta: AttentionMetadata) -> TritonPlan:
        decode_lens = [s for q, s in zip(meta.query_lens, meta.seq_lens) if q == 1]
        prefill_lens = [q for q in meta.query_lens if q > 1]
        num_splits, partition = self._split(len(decode_lens), max(decode_lens, default=0))
        partials = None
        if num_splits > 1:
            device = meta.slot_mapping.device
            shape = (len(decode_lens), self.num_heads, num_splits)
            partials = (torch.empty(*shape, self.head_dim, dtype=torch.float32, device=device),  # outputs
                        torch.empty(shape, dtype=torch.float32, device=device),  # running max (base 2)
                        torch.empty(shape, dtype=torch.float32, device=device))  # sums
        return TritonPlan(len(decode_lens), len(prefill_lens), max(prefill_lens, default=0), num_splits, partition,
                          partials)

    def graph_plan(self, meta: AttentionMetadata) -> TritonPlan:
        """The plan a CUDA graph of decodes is captured with, serving all its replays: `meta`'s host lengths are
        the longest the graph will see (max_model_len), so that its split covers any context (partitions past
        a sequence's end are empty, and the reduce weighs them 0); the kernels read the real lengths from the
        device tensors."""
        return self.plan(meta)

    def update_graph_plan(self, plan: TritonPlan, meta: AttentionMetadata) -> None:
        """Before a replay: nothing to do, the kernels read everything from the graph's buffers."""

    def _split(self, num_decodes: int, max_len: int) -> tuple[int, int]:
        """(partitions, positions per partition) for the decodes' contexts."""
        if self.partition_size is not None:
            partition = self.partition_size
        else:
            programs = max(1, num_decodes * self.num_kv_heads)
            splits = min(-(-self.target_programs // programs), -(-max_len // MIN_PARTITION))
            partition = -(-max_len // max(1, splits))
        partition = max(DECODE_BLOCK_N, -(-partition // DECODE_BLOCK_N) * DECODE_BLOCK_N)
        return max(1, -(-max_len // partition)), partition

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, plan: TritonPlan) -> torch.Tensor:
        """q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] (strided views
        are fine); kv_cache: (K, V), each [num_blocks, block_size, num_kv_heads, head_dim] contiguous.
        Returns [num_tokens, num_heads * head_dim]."""
        k_cache, v_cache = kv_cache
        self.write_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        q = q.contiguous() if q.stride(-1) != 1 else q
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [num_tokens, num_heads, head_dim]
        dot_dtype = tl.float32 if self.interpreting else TL_DTYPES[q.dtype]  # see triton_kernels
        precision = "ieee" if dot_dtype == tl.float32 else "tf32"  # tf32 would cost float32 its parity
        common = dict(HEAD_DIM=self.head_dim, HEAD_DIM_P2=_pow2(self.head_dim, 16), BLOCK_SIZE=meta.block_size,
                      DOT_DTYPE=dot_dtype, DOT_PRECISION=precision)
        strides = (q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3],
                   meta.block_table.stride(0))
        if plan.num_decodes:
            part_out, part_max, part_sum = plan.partials or (out, out, out)  # unused without a split
            decode_kernel[(plan.num_decodes, self.num_kv_heads, plan.num_splits)](
                out, part_out, part_max, part_sum, q, k_cache, v_cache,
                meta.block_table, meta.seq_lens_tensor, meta.query_start_loc, meta.decode_seqs,
                self.scale, plan.partition_size, plan.num_splits, *strides,
                NUM_HEADS=self.num_heads, QUERIES_PER_KV=self.queries_per_kv,
                GROUP_P2=_pow2(self.queries_per_kv, 16), BLOCK_N=DECODE_BLOCK_N, SPLIT=plan.num_splits > 1,
                **common,
            )
            if plan.num_splits > 1:
                decode_reduce_kernel[(plan.num_decodes, self.num_heads)](
                    out, part_out, part_max, part_sum, meta.query_start_loc, meta.decode_seqs,
                    plan.num_splits, out.stride(0), out.stride(1),
                    NUM_HEADS=self.num_heads, SPLITS_P2=_pow2(plan.num_splits),
                    HEAD_DIM=self.head_dim, HEAD_DIM_P2=_pow2(self.head_dim, 16),
                )
        if plan.num_prefills:
            group = _pow2(self.queries_per_kv)
            block_q = max(1, PREFILL_ROWS // group)
            prefill_kernel[(plan.num_prefills, self.num_kv_heads, triton.cdiv(plan.max_prefill_len, block_q))](
                out, q, k_cache, v_cache,
                meta.block_table, meta.seq_lens_tensor, meta.query_start_loc, meta.prefill_seqs,
                self.scale, *strides,
                QUERIES_PER_KV=self.queries_per_kv, GROUP_P2=group, BLOCK_Q=block_q, BLOCK_N=PREFILL_BLOCK_N,
                **common,
            )
        return out.view(q.shape[0], -1)

    def write_cache(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        """Scatter each new token's K and V into its slot: one launch for both."""
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("the KV cache must be contiguous [num_blocks, block_size, num_kv_heads, head_dim]")
        if k.stride(-1) != 1 or v.stride(-1) != 1:
            k, v = k.contiguous(), v.contiguous()
        num_tokens = slot_mapping.numel()
        if num_tokens:
            cache_write_kernel[(num_tokens,)](
                k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                NUM_KV_HEADS=self.num_kv_heads, HEADS_P2=_pow2(self.num_kv_heads),
                HEAD_DIM=self.head_dim, HEAD_DIM_P2=_pow2(self.head_dim),
            )
