"""The FlashInfer attention backend (flashinfer-python), where it is installed: the production default on CUDA.

FlashInfer's NHD paged layout, [max_pages, page_size, num_kv_heads, head_dim] for K and V, is our cache
layout, and its page table is ours in CSR form (indptr + flat block ids + the fill of each last page).
Its wrappers split the work into `plan` (once per step, on host tensors, so no device sync) and `run`
(per layer), as our interface does. Batches of decodes only take the decode wrapper; any batch with a
prefill chunk takes the prefill wrapper (which serves decodes too, as one-token chunks).

Untested in this repository's CI (FlashInfer needs CUDA); bench/gpu_check.py checks it against the
torch backend where it is installed.
"""

import importlib.util
from dataclasses import dataclass

import torch

from .attention import AttentionMetadata

WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's own scratch for split-K; its examples use 128 MiB
HEAD_DIMS = (64, 128, 256)  # the head dims its prebuilt/JIT kernels serve
DTYPES = (torch.float16, torch.bfloat16)


def flashinfer_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why FlashInfer cannot serve this model here; None when it can."""
    if torch.device(device).type != "cuda":
        return "FlashInfer runs on CUDA devices only"
    if importlib.util.find_spec("flashinfer") is None:
        return "flashinfer-python is not installed"
    if dtype not in DTYPES:
        return f"FlashInfer serves float16 and bfloat16, not {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"FlashInfer serves head dims {HEAD_DIMS}, not {head_dim}"
    return None


@dataclass
class FlashInferPlan:
    wrapper: object  # the planned BatchDecode... or BatchPrefillWithPagedKVCacheWrapper


class FlashInferAttentionBackend:
    name = "flashinfer"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype):
        """`dtype`: of q and the cache, which FlashInfer's plan must know (it picks the kernel)."""
        import flashinfer

        from .triton_attention import TritonAttentionBackend

        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.dtype = dtype
        # Our fused Triton write fills the cache (Triton ships with every CUDA build of torch).
        self.cache_writer = TritonAttentionBackend(num_heads, num_kv_heads, head_dim, device)

    def plan(self, meta: AttentionMetadata) -> FlashInferPlan:
        """Page tables in CSR form, built from the metadata's host lists (FlashInfer plans on the host)."""
        if all(q == 1 for q in meta.query_lens):
            self._plan_decode(self.decode, meta)
            return FlashInferPlan(self.decode)
        kv_indptr, kv_indices, last_page_len = self._page_table(meta)
        qo_indptr = torch.tensor([0, *meta.query_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        self.prefill.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, self.num_heads, self.num_kv_heads,
                          self.head_dim, meta.block_size, causal=True, q_data_type=self.dtype, kv_data_type=self.dtype)
        return FlashInferPlan(self.prefill)

    def graph_plan(self, meta: AttentionMetadata) -> FlashInferPlan:
        """A decode wrapper of its own for one CUDA graph's batch size, in FlashInfer's CUDA-graph mode: its page
        table lives in fixed buffers (sized for `meta`'s lengths, the longest the graph will see), and
        `update_graph_plan` plans it again before every replay. The wrappers share the workspace: only the one
        just planned runs."""
        import flashinfer

        batch, device = len(meta.query_lens), meta.slot_mapping.device
        max_pages = sum(-(-s // meta.block_size) for s in meta.seq_lens)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True,
            paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buffer=torch.zeros(max_pages, dtype=torch.int32, device=device),
            paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=device),
        )
        self._plan_decode(wrapper, meta)
        return FlashInferPlan(wrapper)

    def update_graph_plan(self, plan: FlashInferPlan, meta: AttentionMetadata) -> None:
        """Before a replay: the step's page table (padded to the graph's batch size) into the wrapper's buffers."""
        self._plan_decode(plan.wrapper, meta)

    def _plan_decode(self, wrapper, meta: AttentionMetadata) -> None:
        kv_indptr, kv_indices, last_page_len = self._page_table(meta)
        wrapper.plan(kv_indptr, kv_indices, last_page_len, self.num_heads, self.num_kv_heads, self.head_dim,
                     meta.block_size, pos_encoding_mode="NONE", q_data_type=self.dtype, kv_data_type=self.dtype)

    @staticmethod
    def _page_table(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indptr [num_seqs + 1] and last page fills [num_seqs] on the host, page ids [num_pages] on the device)."""
        bs = meta.block_size
        pages = [-(-s // bs) for s in meta.seq_lens]
        kv_indptr = torch.tensor([0, *pages], dtype=torch.int32).cumsum(0, dtype=torch.int32)  # [num_seqs + 1]
        kv_indices = torch.tensor([b for t, n in zip(meta.block_tables, pages) for b in t[:n]], dtype=torch.int32)
        last_page_len = torch.tensor([s - (n - 1) * bs for s, n in zip(meta.seq_lens, pages)], dtype=torch.int32)
        return kv_indptr, kv_indices.to(meta.slot_mapping.device, non_blocking=True), last_page_len

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, plan: FlashInferPlan) -> torch.Tensor:
        self.cache_writer.write_cache(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        out = plan.wrapper.run(q.contiguous(), kv_cache)  # [num_tokens, num_heads, head_dim]
        return out.view(q.shape[0], -1)
