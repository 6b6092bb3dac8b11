"""How many KV blocks a rank's cache gets: a fixed count, a size on the CPU, or on a GPU what is left of the
allowed fraction of its memory once the weights, the largest steps' activations and workspaces (found by
running them) and the decode CUDA graphs are counted."""

import logging
from collections.abc import Callable

import torch

from llamaserve.config import CacheConfig

log = logging.getLogger(__name__)


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V, every layer, this rank's KV heads: 2 x layers x block_size x kv_heads x head_dim x element."""
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def kv_blocks_that_fit(cache: CacheConfig, per_block: int, device: torch.device,
                       run_largest_steps: Callable[[], None], graph_bytes: Callable[[], int] | None = None) -> int:
    """`run_largest_steps()` runs the largest steps the scheduler can build (GPU only); `graph_bytes()` measures
    what the decode graphs will hold (GPU, graphs on)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.type != "cuda":
        return max(1, int(cache.kv_cache_gib * 2**30) // per_block)
    torch.cuda.reset_peak_memory_stats(device)
    run_largest_steps()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)  # weights + the largest step's activations and workspace
    free, total = torch.cuda.mem_get_info(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    graphs = graph_bytes() if graph_bytes is not None else 0
    available = total * cache.gpu_memory_utilization - used_by_others - peak - graphs
    log.info("GPU memory: %.2f GiB in all, %.2f GiB used by other processes, %.2f GiB peak of the weights and the "
             "largest steps, %.2f GiB held by the decode CUDA graphs: %.2f GiB for the KV cache",
             total / 2**30, used_by_others / 2**30, peak / 2**30, graphs / 2**30, max(0, available) / 2**30)
    if available < per_block:
        raise RuntimeError("no GPU memory left for the KV cache; lower max_num_batched_tokens or max_num_seqs, "
                           "pass --enforce-eager, or use more GPUs")
    return int(available // per_block)
