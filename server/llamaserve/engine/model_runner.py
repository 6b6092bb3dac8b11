"""Runs one scheduled step on the model: flat inputs in, one sampled token per sampling request out."""

import logging
from dataclasses import dataclass

import torch

from llamaserve.config import EngineConfig
from llamaserve.engine.messages import TokenLogprobs
from llamaserve.engine.scheduler import SchedulerOutput
from llamaserve.model.architecture import ModelArchitecture
from llamaserve.model.attention import AttentionMetadata, allocate_kv_cache
from llamaserve.model.loader import load_model, parse_dtype, resolve_checkpoint
from llamaserve.model.sampler import Sampler, SamplingBatch

log = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    token_ids: dict[str, int]  # request id -> sampled token, for every request that sampled
    logprobs: dict[str, TokenLogprobs]  # only for requests that asked


def kv_bytes_per_block(arch: ModelArchitecture, block_size: int, dtype: torch.dtype) -> int:
    """K and V, every layer: 2 x layers x block_size x kv_heads x head_dim x element size."""
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * arch.num_hidden_layers * block_size * arch.num_key_value_heads * arch.head_dim * element


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(config.model.device)
        self.dtype = parse_dtype(config.model.dtype)
        self.checkpoint = resolve_checkpoint(config.model.model, config.model.cache_dir)
        self.model = load_model(self.checkpoint, self.dtype, self.device, progress=config.model.show_progress)
        self.arch = self.model.arch
        self.block_size = config.cache.block_size
        self.num_blocks = self._num_kv_blocks()
        self.kv_caches = allocate_kv_cache(
            self.arch.num_hidden_layers, self.num_blocks, self.block_size, self.arch.num_key_value_heads,
            self.arch.head_dim, self.dtype, self.device,
        )
        log.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB)", self.num_blocks, self.block_size,
            self.num_blocks * self.block_size,
            self.num_blocks * kv_bytes_per_block(self.arch, self.block_size, self.dtype) / 2**30,
        )
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own random streams

    def _num_kv_blocks(self) -> int:
        cache = self.config.cache
        per_block = kv_bytes_per_block(self.arch, self.block_size, self.dtype)
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type != "cuda":
            return max(1, int(cache.kv_cache_gib * 2**30) // per_block)
        # GPU: what is left of the allowed fraction after the weights and the activations of the
        # largest step the scheduler can build.
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_forward()
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        available = total * cache.gpu_memory_utilization - used_by_others - torch.cuda.max_memory_allocated(self.device)
        if available < per_block:
            raise RuntimeError("no GPU memory left for the KV cache; lower max_num_batched_tokens or use more GPUs")
        return int(available // per_block)

    def _profile_forward(self) -> None:
        tokens = min(self.config.scheduler.max_num_batched_tokens, self.config.scheduler.max_model_len)
        blocks = -(-tokens // self.block_size)
        kv = allocate_kv_cache(self.arch.num_hidden_layers, blocks, self.block_size, self.arch.num_key_value_heads,
                               self.arch.head_dim, self.dtype, self.device)
        meta = AttentionMetadata.build([tokens], [tokens], [list(range(blocks))], self.block_size, device=self.device)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        self.model(ids, torch.arange(tokens, device=self.device), kv, meta)
        del kv
        torch.cuda.synchronize(self.device)

    def release(self, request_id: str) -> None:
        """Forget a finished request's generator."""
        self.generators.pop(request_id, None)

    def execute(self, step: SchedulerOutput) -> RunnerOutput:
        ids, positions, query_lens, seq_lens, tables, sample = [], [], [], [], [], []
        for item in step.scheduled:
            end = item.start + item.num_new_tokens
            ids.extend(item.request.all_token_ids[item.start : end])
            positions.extend(range(item.start, end))
            query_lens.append(item.num_new_tokens)
            seq_lens.append(end)
            tables.append(item.block_table)
            sample.append(item.sample)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, sample, self.device)
        logits = self.model(
            torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True),
            torch.tensor(positions, dtype=torch.long).to(self.device, non_blocking=True),
            self.kv_caches,
            meta,
        )  # [num_sampling, vocab]
        requests = [item.request for item in step.scheduled if item.sample]
        if not requests:
            return RunnerOutput({}, {})
        batch = SamplingBatch.build(
            [r.sampling_params for r in requests],
            [self._generator(r) for r in requests],
            [r.prompt_token_ids for r in requests],
            [r.output_token_ids for r in requests],
            self.arch.vocab_size,
            self.device,
        )
        out = self.sampler(logits, batch)
        token_ids = out.token_ids.tolist()  # the step's one device-to-host sync
        result = RunnerOutput({r.request_id: t for r, t in zip(requests, token_ids)}, {})
        if out.logprobs is not None:
            logprobs = out.logprobs.tolist()
            top_values, top_ids = (t.tolist() for t in out.top_logprobs)
            for row, r in enumerate(requests):
                k = r.sampling_params.logprobs
                if k is not None:
                    result.logprobs[r.request_id] = TokenLogprobs(
                        logprobs[row], list(zip(top_ids[row][:k], top_values[row][:k]))
                    )
        return result

    def _generator(self, request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        generator = self.generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(seed)
            self.generators[request.request_id] = generator
        return generator
