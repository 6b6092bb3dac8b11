"""Shared fixtures: tiny random checkpoints written by the tests, and the embedded default model."""

import json
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

from llamaserve.model.loader import resolve_checkpoint

# The converted default model is cached across runs (conversion takes ~15 s); CI starts empty.
CACHE_DIR = Path.home() / ".cache" / "llamaserve"
hf_logging.disable_progress_bar()


def make_tiny_checkpoint(path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    """A random Llama written by transformers itself (config.json + safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    # Random init gives near-uniform logits; widen them so greedy choices are decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def write_config(path: Path, **fields) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))
    return path


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    return resolve_checkpoint(None, CACHE_DIR)


def built_kernel(build, cache_dir: Path):
    """One of llamaserve.model.cpu_kernels' builders (bf16_gemm, lora_delta, ...) run into `cache_dir`; the
    test is skipped where this machine cannot build or run that kernel (its layers keep torch's kernels)."""
    kernel = build(cache_dir)
    if kernel is None:
        pytest.skip(f"this machine cannot run llamaserve's {build.__name__} kernel (torch's kernels serve)")
    return kernel
