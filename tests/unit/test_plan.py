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


def test_quantized_weights_against_hand_arithmetic():
    # 7B, int4 in groups of 32: per layer the projections hold 4096×12288 + 4096×4096 + 22016×4096 + 4096×11008
    # = 202,375,168 params, at half a byte each (101,187,584) plus 4 bytes a group (25,296,896); 32 layers
    # → 4,047,503,360. The float16 embedding and head 2 × 32000×4096×2 = 524,288,000, norms 65×4096×2 = 532,480.
    plan = plan_deployment(CONFIGS / "llama-2-7b-chat.yaml", gpu_memory_gib=80, quantization="int4")
    assert plan.weight_bytes == 4_047_503_360 + 524_288_000 + 532_480
    assert plan.weight_params == 6_738_415_616  # the parameters are the same
    # int8 head: 32000×4096 codes + 4 bytes a row replace the float16 head's 262,144,000 bytes
    both = plan_deployment(CONFIGS / "llama-2-7b-chat.yaml", gpu_memory_gib=80, quantization="int4",
                           lm_head_quantization="int8")
    assert both.weight_bytes == plan.weight_bytes - 262_144_000 + 131_072_000 + 128_000
    assert plan_deployment(CONFIGS / "llama-2-7b-chat.yaml", gpu_memory_gib=80, quantization="auto").weight_bytes \
        == plan_deployment(CONFIGS / "llama-2-7b-chat.yaml", gpu_memory_gib=80).weight_bytes  # auto: an upper bound
    with pytest.raises(ValueError, match="quantization must be one of"):
        plan_deployment(CONFIGS / "llama-2-7b-chat.yaml", gpu_memory_gib=80, quantization="int3")


@pytest.mark.parametrize("quantization, lm_head", [("int8", "none"), ("int4", "int8"), ("none", "int4")])
def test_a_quantized_model_holds_what_the_plan_says(tmp_path, quantization, lm_head):
    """On llamaserve's CPU kernels, whose layouts hold exactly these bytes (shapes a multiple of 64 rows). Untied:
    on the CPU a float head tied to the embedding gets a packed copy of its own, which a GPU does not make."""
    from llamaserve.model.loader import load_model
    from llamaserve.model.parallel import Linear
    from tests.conftest import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    model = load_model(checkpoint, "bfloat16", quantization=quantization, lm_head_quantization=lm_head,
                       cache_dir=tmp_path)
    quantized = [m.quantized for m in model.modules() if isinstance(m, Linear) and m.quantized is not None]
    if any(type(q).__name__ not in ("Int8KernelWeight", "Int4KernelWeight") for q in quantized):
        pytest.skip("this machine cannot run llamaserve's CPU kernels")
    held = sum(t.numel() * t.element_size() for q in quantized for t in vars(q).values() if isinstance(t, torch.Tensor))
    held += sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                if "norm" in name or "embed" in name)
    held += sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                if isinstance(m, Linear) and m.quantized is None)  # float projections (packed: the same bytes)
    plan = plan_rank(model.arch, tensor_parallel_size=1, dtype="bfloat16", gpu_memory_gib=1,
                     quantization=quantization, lm_head_quantization=lm_head)
    assert held == plan.weight_bytes
