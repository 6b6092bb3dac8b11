"""What bench/gpu_check.py measures with: Llama shapes, random-weight models built on the device (ours and
transformers' on the very same tensors), an engine-like driver over a paged KV cache, and wall timing.

Nothing is downloaded: weights are random (transformers' own init), built where they run.
"""

import gc
import random
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as ReferenceLlama

from llamaserve.model.architecture import ModelArchitecture
from llamaserve.model.attention import AttentionMetadata, allocate_kv_cache
from llamaserve.model.llama import LlamaForCausalLM

COMMON = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    # Two-layer slices at real widths, for the strict float32 parity: MHA (Llama 2 7B), GQA 4 (Llama 3 8B),
    # GQA 8 (Llama 2 70B).
    "7b-2l": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                  num_key_value_heads=32),
    "8b-gqa4-2l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                       num_key_value_heads=8),
    "70b-gqa8-2l": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=2, num_attention_heads=64,
                        num_key_value_heads=8),
    # --dry-run stand-ins (head_dim 32).
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "tiny-gqa4": dict(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2),
}


def hf_config(shape: str) -> LlamaConfig:
    return LlamaConfig(**{**COMMON, **SHAPES[shape]})


@torch.no_grad()
def build_reference(config: LlamaConfig, dtype: torch.dtype, device) -> ReferenceLlama:
    """transformers' Llama with its own random init, allocated on `device` in `dtype` from the start."""
    with torch.device(device):
        try:
            model = ReferenceLlama._from_config(config, dtype=dtype)
        except TypeError:  # transformers releases that still call it torch_dtype
            model = ReferenceLlama._from_config(config, torch_dtype=dtype)
    return model.eval()


class TensorCheckpoint:
    """A state dict in the checkpoint interface our layers load from (names, shape, read a slice)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t = self.tensors[name]
        if dim is None:
            return t
        return t.narrow(dim, start, (t.shape[dim] if stop is None else stop) - start)


def build_ours(config: LlamaConfig, dtype, device, backend: str, weights: dict | None = None) -> LlamaForCausalLM:
    """Our model on `device`: loaded from `weights` (a transformers state dict, shared shapes), or random."""
    arch = ModelArchitecture.from_dict(config.to_dict())
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, attention_backend=backend)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    if weights is not None:
        model.load_weights(TensorCheckpoint(weights))
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, config.initializer_range)
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step must read: every weight but the embedding table (it reads a few rows of it)."""
    embed = model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


class PagedBatch:
    """Steps our model as the engine does: flat mixed batches over a paged cache with shuffled block tables."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype, device, seed: int = 0):
        arch = model.arch
        self.model, self.block_size, self.device = model, block_size, device
        self.kv = allocate_kv_cache(arch.num_hidden_layers, num_blocks, block_size, model.heads[1], arch.head_dim,
                                    dtype, device)
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def metadata(self, work: list[tuple[int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """work: (sequence id, new token ids). Allocates blocks and advances the lengths."""
        ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for seq, tokens in work:
            start = self.lengths.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * self.block_size < start + len(tokens):
                table.append(self.free.pop())
            ids += tokens
            positions += range(start, start + len(tokens))
            query_lens.append(len(tokens))
            seq_lens.append(start + len(tokens))
            tables.append(table)
            self.lengths[seq] = start + len(tokens)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.block_size, device=self.device)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long).to(self.device)  # noqa: E731
        return as_tensor(ids), as_tensor(positions), meta

    def step(self, work: list[tuple[int, list[int]]]) -> torch.Tensor:
        """[len(work), vocab] float32: the logits after each sequence's last new token."""
        ids, positions, meta = self.metadata(work)
        return self.model(ids, positions, self.kv, meta)


def free_device_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def wall_seconds(fn, device, iters: int = 10, warmup: int = 2) -> float:
    """Median wall seconds of one fn() call, the device synchronised around each: the step time as the host
    sees it, launch overhead included (without CUDA graphs that is part of what a step costs)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (num, length), generator=g).tolist()
