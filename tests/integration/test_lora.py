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
from llamaserve.engine.messages import AddRequest, LoadAdapter, UnloadAdapter
from llamaserve.model.cpu_kernels import lora_delta
from llamaserve.model.loader import load_model
from llamaserve.model.lora import AdapterError, LoraAdapter, LoraManager, LoraStack, SegmentedLoraStack
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


GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
ENGINE = dict(num_blocks=128, block_size=4, max_model_len=256)


def peft_greedy(base, adapter, prompt: list[int]) -> list[int]:
    model = ReferenceLlama.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()


def generate(core: EngineCore, requests: dict[str, tuple[list[int], str | None]]) -> dict[str, list[int]]:
    """Greedy tokens of requests (id -> (prompt, adapter)) submitted together."""
    tokens = {request_id: [] for request_id in requests}
    for request_id, (prompt, lora) in requests.items():
        assert core.add_request(AddRequest(request_id, prompt, GREEDY, lora=lora)) is None
    while core.has_work():
        for out in core.step():
            assert out.finish_reason != "error", out.error
            tokens[out.request_id] += out.new_token_ids
    return tokens


def engine(base, tp: int = 1, **options) -> EngineCore:
    return EngineCore(EngineConfig.from_options(model=str(base), tensor_parallel_size=tp, **ENGINE, **options))


def test_merged_greedy_tokens_equal_merge_and_unload_on_one_and_two_ranks(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "adapter", seed=1)
    expected = peft_greedy(base, adapter, TOKENS)
    for tp in (1, 2):
        core = engine(base, tp, merge_lora=str(adapter))
        try:
            assert generate(core, {"r": (TOKENS, None)})["r"] == expected, f"tp={tp}"
        finally:
            core.shutdown()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Two adapters of different ranks and targets, and each one's (and the base's) output from PEFT."""
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(base, root / "a", seed=1)
    b = make_adapter(base, root / "b", seed=2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    prompts = [TOKENS, TOKENS[3:] + [11, 12]]
    expected = {(p, name): peft_greedy(base, path, prompt) for p, prompt in enumerate(prompts)
                for name, path in ((None, None), ("a", a), ("b", b))}
    return {"a": str(a), "b": str(b)}, prompts, expected


@pytest.mark.parametrize("tp,max_loras,cpu_kernels", [(1, 2, True), (1, 1, True), (2, 2, True), (1, 2, False)])
def test_one_batch_mixes_the_base_and_two_adapters_and_each_gets_its_own_output(base, adapters, tp, max_loras,
                                                                                 cpu_kernels):
    """On llamaserve's CPU kernel (model/csrc/lora.c) where it runs, and on the torch stacks (--no-cpu-kernels)."""
    paths, prompts, expected = adapters
    core = engine(base, tp, lora_modules=tuple(f"{n}={p}" for n, p in paths.items()), max_loras=max_loras,
                  max_lora_rank=8, cpu_kernels=cpu_kernels)
    try:
        stacks = {type(module.lora) for module in core.runner.model.modules() if getattr(module, "lora", None)}
        on_kernel = cpu_kernels and lora_delta(core.config.model.cache_dir) is not None
        assert stacks == {SegmentedLoraStack if on_kernel else LoraStack}
        # One after another, the same prompt under the base, a and b: the prefix cache must not hand one
        # adapter's K/V to another.
        for name in (None, "a", "b"):
            assert generate(core, {"solo": (prompts[0], name)})["solo"] == expected[(0, name)], name
        # All at once, in one batch (with one slot, the scheduler lets one adapter run at a time).
        requests = {f"{p}-{name}": (prompt, name) for p, prompt in enumerate(prompts) for name in (None, "a", "b")}
        tokens = generate(core, requests)
        assert tokens == {f"{p}-{name}": expected[(p, name)] for p, _ in enumerate(prompts) for name in (None, "a", "b")}
    finally:
        core.shutdown()


def test_adapters_load_and_unload_while_the_engine_runs(base, adapters, tmp_path):
    paths, prompts, expected = adapters
    core = engine(base, enable_lora=True, max_loras=1, max_lora_rank=8)
    try:
        assert core.add_request(AddRequest("early", prompts[0], GREEDY, lora="a")) is not None  # not loaded yet
        assert core.run_command(LoadAdapter(1, "a", paths["a"])).error is None
        assert "already" in core.run_command(LoadAdapter(2, "a", paths["a"])).error
        too_big = make_adapter(base, tmp_path / "big", r=16, lora_alpha=16)
        assert "max-lora-rank" in core.run_command(LoadAdapter(3, "big", str(too_big))).error
        assert "adapter_config.json" in core.run_command(LoadAdapter(4, "nothing", str(tmp_path))).error
        assert generate(core, {"r": (prompts[0], "a")})["r"] == expected[(0, "a")]
        assert core.run_command(UnloadAdapter(5, "a")).error is None
        assert core.add_request(AddRequest("late", prompts[0], GREEDY, lora="a")) is not None
        assert generate(core, {"r": (prompts[0], None)})["r"] == expected[(0, None)]
    finally:
        core.shutdown()


def rewrite_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("case,message", [
    ("pickle", "pickle"),
    ("dora", "DoRA"),
    ("modules_to_save", "modules_to_save"),
    ("embedding", "not supported"),
    ("no config", "adapter_config.json"),
    ("config not json", "not valid JSON"),
    ("corrupt weights", "not a safetensors file"),
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
    elif case == "config not json":
        (adapter / "adapter_config.json").write_text("{not json")
    elif case == "corrupt weights":  # a header length far beyond the file: refused, not allocated
        (adapter / "adapter_model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(AdapterError, match=message):
        LoraAdapter.load(adapter)


def test_an_adapter_for_another_base_is_refused(base, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other", hidden_size=32, intermediate_size=64, seed=2)
    adapter = make_adapter(other, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="another base"):
        load_model(base, merge_lora=adapter)


@pytest.mark.parametrize("on_kernel", [True, False], ids=["kernel", "torch"])
def test_slot_logits_equal_peft_for_each_adapter_in_one_mixed_step(base, adapters, tmp_path, on_kernel):
    """Three sequences in one step, under the base, adapter a (slot 0) and adapter b (slot 1), then
    decodes in the same mix: each row equals PeftModel's (or the base's) logits, on llamaserve's CPU kernel
    (model/csrc/lora.c) and on the torch stacks it replaces."""
    paths, _, _ = adapters
    model = load_model(base)
    kernel = lora_delta(tmp_path / "cache") if on_kernel else None
    if on_kernel and kernel is None:
        pytest.skip("this machine cannot run the AVX-512 LoRA kernel")
    lora = LoraManager(model, num_slots=2, max_rank=8, kernel=kernel)
    stacks = {type(module.lora) for module in model.modules() if getattr(module, "lora", None) is not None}
    assert stacks == {SegmentedLoraStack if on_kernel else LoraStack}
    for slot, name in enumerate("ab"):
        lora.load(slot, lora.adapter(paths[name]))
    sequences = PagedSequences(model)
    slots = {0: -1, 1: 0, 2: 1}  # sequence -> slot
    rows = {seq: [] for seq in slots}
    for step in [[(seq, TOKENS[:5]) for seq in slots]] + [[(seq, [t]) for seq in slots] for t in TOKENS[5:]]:
        lora.set_step(torch.tensor([slots[seq] for seq, tokens in step for _ in tokens]), active=2)
        for seq, row in zip(slots, sequences.step(step)):
            rows[seq].append(row)
    for seq, path in ((0, None), (1, paths["a"]), (2, paths["b"])):
        reference = ReferenceLlama.from_pretrained(base)
        if path is not None:
            reference = PeftModel.from_pretrained(reference, path)
        with torch.no_grad():
            expected = reference.eval()(torch.tensor([TOKENS])).logits[0, 4:]
        ours = torch.stack(rows[seq])
        assert torch.allclose(ours, expected, atol=TOL), (seq, (ours - expected).abs().max())


def test_a_step_that_fails_while_loading_an_adapter_leaves_no_stale_slot(base, adapters, monkeypatch):
    paths, prompts, expected = adapters
    core = engine(base, lora_modules=(f"a={paths['a']}",), max_lora_rank=8)
    try:
        load = core.runner.lora.load

        def broken(*args):
            monkeypatch.setattr(core.runner.lora, "load", load)  # once
            raise RuntimeError("a fault while loading the slot")

        monkeypatch.setattr(core.runner.lora, "load", broken)
        assert core.add_request(AddRequest("failed", prompts[0], GREEDY, lora="a")) is None
        outputs = [out for _ in range(3) if core.has_work() for out in core.step()]
        assert [(o.request_id, o.finish_reason) for o in outputs] == [("failed", "error")]
        assert generate(core, {"r": (prompts[0], "a")})["r"] == expected[(0, "a")]  # loaded again, not assumed
    finally:
        core.shutdown()
