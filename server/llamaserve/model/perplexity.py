"""Perplexity of a model over a token sequence: how a quantized model's quality is measured against float32.

The text is cut into windows of `window` tokens; each window is one sequence prefilled through the paged
KV cache, and every token after a window's first is predicted from the tokens before it in the window.
"""

import dataclasses
import math

import torch

from .attention import AttentionMetadata, allocate_kv_cache
from .llama import LlamaForCausalLM


@dataclasses.dataclass(frozen=True)
class Perplexity:
    perplexity: float
    tokens: int  # predictions scored
    top1: torch.Tensor  # [tokens] long: the most likely next token at each scored position

    def agreement(self, other: "Perplexity") -> float:
        """The fraction of positions where both models' most likely next token is the same."""
        return (self.top1 == other.top1).float().mean().item()


@torch.inference_mode()
def perplexity(model: LlamaForCausalLM, token_ids: list[int], window: int = 512, block_size: int = 16) -> Perplexity:
    arch = model.arch
    dtype = model.model.embed_tokens.weight.dtype
    device = model.model.embed_tokens.weight.device
    num_blocks = -(-window // block_size)
    kv = allocate_kv_cache(arch.num_hidden_layers, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim,
                           dtype, device)
    nll, scored, top1 = 0.0, 0, []
    for start in range(0, len(token_ids) - 1, window):
        ids = torch.tensor(token_ids[start : start + window], device=device)
        n = ids.numel()
        if n < 2:
            break
        meta = AttentionMetadata.build([n], [n], [list(range(num_blocks))], block_size, device=device)
        meta = dataclasses.replace(meta, logits_indices=torch.arange(n - 1, device=device))  # every position
        logits = model(ids, torch.arange(n, device=device), kv, meta)  # [n - 1, vocab] float32
        nll += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
        scored += n - 1
        top1.append(logits.argmax(-1).cpu())
    return Perplexity(math.exp(nll / scored), scored, torch.cat(top1))
