"""LoRA adapters made with PEFT itself on a tiny checkpoint: merged at load, our logits equal PeftModel's;
whatever PEFT can save that we cannot serve is refused by name."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM as ReferenceLlama

from llamaserve.config import EngineConfig
from llamaserve.engine.core import EngineCore
from llamaserve.engine.messages import AddRequest
from llamaserve.model.loader import load_model
from llamaserve.model.lora import AdapterError, LoraAdapter
from llamaserve.sampling_params import SamplingParams
from tests.conftest import make_tiny_checkpoint
from tests.integration.test_model_parity import PagedSequences

TOL = 1e-4
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = [5, 17, 99, 3, 250, 42, 8, 77, 120, 64, 1, 200]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("base"), max_position_embeddings=256, seed=5)


def make_adapter(base, path, seed=0, **config):
    """An adapter as PEFT writes it; random B (init_lora_weights=False), so it changes the output."""
    torch.manual_seed(seed)
    model = get_peft_model(ReferenceLlama.from_pretrained(base),
                           LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8,
                                                                  "target_modules": ALL_MODULES, **config}))
    model.save_pretrained(path)
    return path


def reference_logits(base, adapter) -> torch.Tensor:
    model = PeftModel.from_pretrained(ReferenceLlama.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0]  # [tokens, vocab]


def our_logits(base, adapter) -> torch.Tensor:
    sequences = PagedSequences(load_model(base, merge_lora=adapter))
    # A prefill chunk, then decodes: the paged paths the engine takes.
    rows = [sequences.step([(0, TOKENS[:5])])[0]]
    rows += [sequences.step([(0, [t])])[0] for t in TOKENS[5:]]
    return torch.stack(rows)  # [tokens - 4, vocab]


@pytest.mark.parametrize("config", [
    {},
    {"use_rslora": True, "r": 8, "lora_alpha": 16},
    {"target_modules": ["q_proj", "v_proj"]},  # the PEFT default for Llama
])
def test_merged_adapter_logits_equal_peft(base, tmp_path, config):
    adapter = make_adapter(base, tmp_path / "adapter", **config)
    expected = reference_logits(base, adapter)[4:]
    ours = our_logits(base, adapter)
    assert torch.allclose(ours, expected, atol=TOL), (ours - expected).abs().max()
    plain = torch.stack([r for r in our_logits(base, None)])
    assert (plain - ours).abs().max() > 100 * TOL  # the adapter changes the output


def test_merged_greedy_tokens_equal_merge_and_unload_on_one_and_two_ranks(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter", seed=1)
    merged = PeftModel.from_pretrained(ReferenceLlama.from_pretrained(base), adapter).merge_and_unload()
    with torch.no_grad():
        expected = merged.generate(torch.tensor([TOKENS]), max_new_tokens=10, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(TOKENS):].tolist()
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    options = dict(num_blocks=64, block_size=4, max_model_len=256, merge_lora=str(adapter))
    for tp in (1, 2):
        core = EngineCore(EngineConfig.from_options(model=str(base), tensor_parallel_size=tp, **options))
        try:
            assert core.add_request(AddRequest("r", TOKENS, params)) is None
            tokens = []
            while core.has_work():
                tokens += [t for out in core.step() for t in out.new_token_ids]
        finally:
            core.shutdown()
        assert tokens == expected, f"tp={tp}"


def rewrite_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("case,message", [
    ("pickle", "pickle"),
    ("dora", "DoRA"),
    ("modules_to_save", "modules_to_save"),
    ("embedding", "not supported"),
    ("no config", "adapter_config.json"),
])
def test_adapters_we_cannot_serve_are_refused_by_name(base, tmp_path, case, message):
    adapter = tmp_path / "adapter"
    if case == "dora":
        make_adapter(base, adapter, use_dora=True)
    elif case == "embedding":
        make_adapter(base, adapter, target_modules=["q_proj", "embed_tokens"])
    else:
        make_adapter(base, adapter)
    if case == "pickle":
        weights = adapter / "adapter_model.safetensors"
        shutil.move(weights, adapter / "adapter_model.bin")
    elif case == "modules_to_save":
        rewrite_config(adapter, modules_to_save=["lm_head"])
    elif case == "no config":
        (adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=message):
        LoraAdapter.load(adapter)


def test_an_adapter_for_another_base_is_refused(base, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other", hidden_size=32, intermediate_size=64, seed=2)
    adapter = make_adapter(other, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="another base"):
        load_model(base, merge_lora=adapter)
