"""Model configs: both config.json forms, the Llama 2 deployment configs, clear refusals."""

from pathlib import Path

import pytest
import torch

from llamaserve.model.architecture import ModelArchitecture
from llamaserve.model.llama import LlamaForCausalLM

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

BASE = dict(
    model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
)


@pytest.mark.parametrize(
    "name, params",
    [("7b", 6_738_415_616), ("13b", 13_015_864_320), ("70b", 68_976_648_192)],
)
def test_llama2_parameter_counts(name, params):
    arch = ModelArchitecture.from_yaml(CONFIGS / f"llama-2-{name}-chat.yaml")
    assert arch.vocab_size == 32000 and arch.rope_theta == 10000.0 and arch.rms_norm_eps == 1e-5
    assert arch.max_position_embeddings == 4096
    with torch.device("meta"):
        model = LlamaForCausalLM(arch)
    assert sum(p.numel() for p in model.parameters()) == params


def test_llama2_70b_uses_grouped_query_attention():
    arch = ModelArchitecture.from_yaml(CONFIGS / "llama-2-70b-chat.yaml")
    assert (arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim) == (64, 8, 128)


def test_old_and_new_rope_forms_agree():
    old = ModelArchitecture.from_dict(
        {**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "dynamic", "factor": 4.0}}
    )
    new = ModelArchitecture.from_dict(
        {**BASE, "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 500000.0}}
    )
    assert old == new
    assert old.rope_theta == 500000.0 and old.rope_scaling.rope_type == "dynamic" and old.rope_scaling.factor == 4.0
    plain = ModelArchitecture.from_dict(BASE)
    assert plain.rope_scaling.rope_type == "default" and plain.rope_theta == 10000.0
    assert plain.head_dim == 8 and plain.eos_token_ids == (2,)


def test_eos_list_and_head_dim_override():
    arch = ModelArchitecture.from_dict({**BASE, "eos_token_id": [128001, 128009], "head_dim": 32})
    assert arch.eos_token_ids == (128001, 128009) and arch.q_size == 256 and arch.kv_size == 64


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 3}, "must divide"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "unsupported rope scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"model_type": "gpt2"}, "not a Llama"),
    ],
)
def test_refusals(change, message):
    with pytest.raises(ValueError, match=message):
        ModelArchitecture.from_dict({**BASE, **change})
