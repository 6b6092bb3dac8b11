"""CUDA graphs for decode-only steps: the model's forward captured at startup for bucketed batch sizes (1, 2,
4, ... up to max_num_seqs) over static buffers, replayed with a decode batch padded to the next bucket. A
decode step of a large model is launch-bound at small batches (hundreds of kernels of microseconds each); a
replay launches them all at once.

A padded row computes garbage that nobody reads: it writes no K/V (slot -1, which the cache writer skips),
attends over one cached position (seq_len 1, through a valid block id) and its logits are cut off. Prefill and
mixed steps, steps with LoRA adapters, and backends without graph plans (the torch reference) run eagerly.
The kernels of one replay read the step's real lengths and block tables from the static buffers; the backend's
plan was made for the longest context (max_model_len), so it serves every replay (see the backends'
`graph_plan`).
"""

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from llamaserve.engine.runner.inputs import ModelInputs, StepInputs
from llamaserve.model.attention import AttentionMetadata

log = logging.getLogger(__name__)


def batch_sizes(max_num_seqs: int) -> list[int]:
    """The captured batch sizes: powers of two below max_num_seqs, and max_num_seqs itself."""
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs]
    return sizes + [max_num_seqs]


def serves_graphs(backend) -> bool:
    return hasattr(backend, "graph_plan")


class CudaGraph:
    """One captured forward; `replay()` runs it again on what its input buffers hold now."""

    @staticmethod
    def new_pool():
        return torch.cuda.graph_pool_handle()

    def __init__(self, forward: Callable[[], torch.Tensor], pool):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = forward()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


class DecodeGraphs:
    def __init__(self, model, kv_caches, block_size: int, max_num_seqs: int, max_model_len: int,
                 graph: type = CudaGraph):
        """`graph`: what captures a forward (CudaGraph; tests on the CPU pass an eager stand-in)."""
        k_cache = kv_caches[0][0]
        self.model, self.kv_caches, self.block_size, self.max_model_len = model, kv_caches, block_size, max_model_len
        self.device = k_cache.device
        self.backend = model.attention_for(self.device, k_cache.dtype)
        if not serves_graphs(self.backend):
            raise ValueError(f"the {self.backend.name} attention backend has no CUDA graph plan")
        self.graph_type = graph
        self.sizes = batch_sizes(max_num_seqs)
        most, width = self.sizes[-1], -(-max_model_len // block_size)
        as_long = dict(dtype=torch.long, device=self.device)
        # Static inputs, the first rows of each used by a replay; a bucket's padding rows are set per replay.
        self.input_ids = torch.zeros(most, **as_long)  # [max batch]
        self.positions = torch.zeros(most, **as_long)
        self.slot_mapping = torch.full((most,), -1, **as_long)
        self.seq_lens = torch.ones(most, **as_long)  # a decode token's own seq_len too (dynamic RoPE)
        self.block_table = torch.zeros(most, width, **as_long)  # [max batch, max blocks per sequence]
        self.rows = torch.arange(most + 1, **as_long)  # query_start_loc, decode_seqs and logits_indices: i -> i
        self.graphs: dict[int, tuple[object, AttentionMetadata, object]] = {}  # size -> (graph, meta, plan)

    def _meta(self, size: int) -> AttentionMetadata:
        """The static buffers as one bucket's metadata; its host lists describe the longest contexts."""
        width = self.block_table.shape[1]
        return AttentionMetadata(
            query_lens=[1] * size, seq_lens=[self.max_model_len] * size, block_tables=[[0] * width] * size,
            block_size=self.block_size, slot_mapping=self.slot_mapping[:size], token_seq_lens=self.seq_lens[:size],
            logits_indices=self.rows[:size], query_start_loc=self.rows[: size + 1],
            seq_lens_tensor=self.seq_lens[:size], block_table=self.block_table[:size], decode_seqs=self.rows[:size],
            prefill_seqs=self.rows[:0],
        )

    def capture(self) -> None:
        """Every bucket, the largest first, so that the smaller ones reuse its memory from the shared pool."""
        pool = self.graph_type.new_pool()
        for size in reversed(self.sizes):
            meta = self._meta(size)
            plan = self.backend.graph_plan(meta)

            def forward(size=size, meta=meta, plan=plan):
                return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, meta,
                                  attention_plan=plan)

            forward()  # compiles the kernels and runs what initialises lazily, outside the capture
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.graphs[size] = (self.graph_type(forward, pool), meta, plan)

    def serves(self, inputs: StepInputs) -> bool:
        return inputs.is_decode and len(inputs.query_lens) <= self.sizes[-1] and not inputs.uses_adapters

    def run(self, inputs: StepInputs, step: ModelInputs) -> torch.Tensor:
        """The logits of a decode step ([num_seqs, vocab]) from the replay of its bucket's graph."""
        n = len(inputs.query_lens)
        size = next(s for s in self.sizes if s >= n)
        meta = step.meta
        self.input_ids[:n].copy_(step.input_ids)
        self.positions[:n].copy_(step.positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(meta.seq_lens_tensor)
        self.seq_lens[n:size].fill_(1)
        self.block_table[:n, : meta.block_table.shape[1]].copy_(meta.block_table)
        graph, captured, plan = self.graphs[size]
        padding = size - n
        self.backend.update_graph_plan(plan, replace(
            captured, seq_lens=list(inputs.seq_lens) + [1] * padding,
            block_tables=list(inputs.block_tables) + [[0]] * padding))
        return graph.replay()[:n]


def graph_memory(model, kv_caches_for: Callable[[int], list], block_size: int, max_num_seqs: int,
                 max_model_len: int) -> int:
    """Device bytes the decode graphs will hold beyond what the eager steps use (their private memory pool, the
    static buffers, the driver's graph objects), measured by capturing them over a one-block scratch KV cache
    and letting them go again. `kv_caches_for(num_blocks)` allocates a cache."""
    device = next(model.parameters()).device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info(device)[0]
    scratch = kv_caches_for(1)
    scratch_bytes = sum(t.numel() * t.element_size() for pair in scratch for t in pair)
    graphs = DecodeGraphs(model, scratch, block_size, max_num_seqs, max_model_len)
    graphs.capture()
    torch.cuda.synchronize(device)
    used = free_before - torch.cuda.mem_get_info(device)[0] - scratch_bytes
    del graphs, scratch
    torch.cuda.empty_cache()
    return max(0, used)
