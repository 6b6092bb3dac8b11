"""`llamaserve plan`: per-rank weight and KV memory of the Llama 2 deployments, against hand arithmetic."""

from pathlib import Path

import pytest
import torch

from llamaserve.cli import main
from llamaserve.model.architecture import ModelArchitecture
from llamaserve.model.llama import LlamaForCausalLM
from llamaserve.model.sharding import TensorParallel, heads_per_rank
from llamaserve.plan import plan_deployment, plan_rank

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# 70B, tp=8, params per rank:
#   embedding 32000×8192/8 = 32,768,000; lm_head the same                        →     65,536,000
#   per layer: q 8192×8192/8 = 8,388,608; k, v 8192×1024/8 = 1,048,576 each;
#              o 8,388,608; gate/up/down 8192×28672/8 = 29,360,128 each;
#              norms 2×8192 = 16,384 (replicated)                                  →    106,971,136
#   80 layers                                                                      →  8,557,690,880
#   final norm 8192 (replicated)
#   total 65,536,000 + 8,557,690,880 + 8,192                                       =  8,623,235,072
LLAMA2 = {
    # name: (tp, weight bytes per rank, KV bytes per token per rank)
    "7b": (1, 13_476_831_232, 524_288),  # 6,738,415,616 params × 2; KV 2×32 layers×32 heads×128×2
    "13b": (1, 26_031_728_640, 819_200),  # 13,015,864,320 params × 2; KV 2×40×40×128×2
    "70b": (8, 17_246_470_144, 40_960),  # 8,623,235,072 params × 2; KV 2×80×1×128×2
}

TINY = dict(
    vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=2,
)


@pytest.mark.parametrize("name", LLAMA2)
def test_llama2_weight_and_kv_bytes_per_rank(name):
    tp, weight_bytes, kv_bytes_per_token = LLAMA2[name]
    plan = plan_deployment(CONFIGS / f"llama-2-{name}-chat.yaml", gpu_memory_gib=80)
    assert plan.tensor_parallel_size == tp and plan.dtype == "float16" and plan.max_model_len == 4096
    assert plan.weight_bytes == weight_bytes
    assert plan.kv_bytes_per_token == kv_bytes_per_token
    assert plan.fits
    assert plan.kv_tokens == plan.usable_bytes // kv_bytes_per_token
    assert plan.max_sequences == plan.kv_tokens // 4096
    assert plan.usable_bytes == int(80 * 2**30 * 0.9) - weight_bytes - plan.activation_bytes


@pytest.mark.parametrize("name, tp", [("7b", 1), ("13b", 1), ("70b", 1), ("7b", 4), ("13b", 8), ("70b", 8),
                                      ("70b", 16)])
def test_every_rank_of_the_meta_model_holds_what_the_plan_says(name, tp):
    """The parallel layers, built on the meta device for each rank, against the plan's formula (70B at
    tp=16 replicates each KV head on two ranks)."""
    arch = ModelArchitecture.from_yaml(CONFIGS / f"llama-2-{name}-chat.yaml")
    plan = plan_deployment(CONFIGS / f"llama-2-{name}-chat.yaml", gpu_memory_gib=80, tensor_parallel_size=tp)
    for rank in sorted({0, tp - 1}):
        with torch.device("meta"):
            model = LlamaForCausalLM(arch, TensorParallel(rank, tp)).to(torch.float16)
        assert sum(p.numel() * p.element_size() for p in model.parameters()) == plan.weight_bytes
        attention = model.model.layers[0].self_attn
        assert (attention.num_heads, attention.num_kv_heads) == (plan.q_heads, plan.kv_heads)


def test_tied_embeddings_are_counted_once():
    arch = ModelArchitecture(**TINY, head_dim=8, tie_word_embeddings=True)
    with torch.device("meta"):
        model = LlamaForCausalLM(arch)
    plan = plan_rank(arch, tensor_parallel_size=1, dtype="float32", gpu_memory_gib=1)
    assert plan.weight_params == sum(p.numel() for p in model.parameters())


def test_70b_tp3_is_refused():
    with pytest.raises(ValueError, match="does not divide num_attention_heads"):
        plan_deployment(CONFIGS / "llama-2-70b-chat.yaml", gpu_memory_gib=80, tensor_parallel_size=3)


def test_kv_heads_replicated_when_tp_exceeds_them():
    arch = ModelArchitecture(**TINY, head_dim=8)  # 8 query heads, 2 KV heads
    assert heads_per_rank(arch, 2) == (4, 1)
    assert heads_per_rank(arch, 4) == (2, 1)  # each KV head on 2 ranks
    plan = plan_rank(arch, tensor_parallel_size=4, dtype="float32", gpu_memory_gib=1, max_model_len=32)
    assert plan.kv_bytes_per_token == 2 * 2 * 1 * 8 * 4  # K and V × 2 layers × 1 KV head × head_dim 8 × 4 bytes
    # embedding and lm_head 100/4 × 64 each; per layer q, o 2×8×64 each, k, v 1×8×64 each,
    # gate/up/down 64×128/4 each, norms 2×64; final norm 64
    assert plan.weight_params == 2 * 25 * 64 + 2 * (2 * 1024 + 2 * 512 + 3 * 2048 + 128) + 64


def test_uneven_tp_is_refused():
    with pytest.raises(ValueError, match="not a multiple"):
        heads_per_rank(ModelArchitecture(**{**TINY, "num_attention_heads": 6}, head_dim=8), 3)  # 2 KV heads
    with pytest.raises(ValueError, match="does not divide num_key_value_heads"):
        heads_per_rank(ModelArchitecture(**{**TINY, "num_attention_heads": 12, "num_key_value_heads": 6},
                                         head_dim=8), 4)


def test_vocabulary_is_padded_to_a_multiple_of_tp():
    arch = ModelArchitecture(**{**TINY, "vocab_size": 101}, head_dim=8)
    sharded = plan_rank(arch, tensor_parallel_size=2, dtype="float32", gpu_memory_gib=1).weight_params
    even = plan_rank(ModelArchitecture(**{**TINY, "vocab_size": 102}, head_dim=8),
                     tensor_parallel_size=2, dtype="float32", gpu_memory_gib=1).weight_params
    assert sharded == even  # 101 rows padded to 102, 51 per rank


def test_cli_prints_the_plan(capsys):
    assert main(["plan", "--config", str(CONFIGS / "llama-2-70b-chat.yaml"), "--gpu-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "each of 8 ranks" in out
    assert "17,246,470,144 bytes" in out and "40,960 bytes" in out
    plan = plan_deployment(CONFIGS / "llama-2-70b-chat.yaml", gpu_memory_gib=80)
    assert f"{plan.kv_tokens:,}" in out and f"4096-token sequences {plan.max_sequences:,}" in out


def test_cli_overrides_and_weights_that_do_not_fit(capsys):
    config = str(CONFIGS / "llama-2-70b-chat.yaml")
    assert main(["plan", "--config", config, "--gpu-memory-gib", "80", "--tensor-parallel-size", "1"]) == 1
    out = capsys.readouterr().out
    assert "do not fit" in out and "137,953,296,384 bytes" in out  # 68,976,648,192 params × 2
    assert main(["plan", "--config", config, "--gpu-memory-gib", "80", "--dtype", "float32"]) == 0
    assert "81,920 bytes" in capsys.readouterr().out  # KV per token: 2×80×1×128×4
    assert main(["plan", "--config", config, "--gpu-memory-gib", "80", "--max-model-len", "2048"]) == 0
    assert "2048-token sequences" in capsys.readouterr().out
    assert main(["plan", "--config", config, "--gpu-memory-gib", "80", "--tensor-parallel-size", "3"]) == 2
    assert "num_attention_heads (64)" in capsys.readouterr().err
