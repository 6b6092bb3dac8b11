"""llamaserve's CPU kernels in whole models: an engine on the bfloat16 kernel gives each request its solo greedy
output in any batch, the default model on it scores the perplexity text as oneDNN's bfloat16 does, and a decode
step's layers in one call (cpu_kernels.DecoderLayers) give what they give one kernel call at a time."""

import pytest
import torch

from llamaserve.model.attention import AttentionMetadata, allocate_kv_cache
from llamaserve.model.loader import load_model
from llamaserve.model.perplexity import perplexity
from tests.conftest import make_tiny_checkpoint
from tests.integration.test_engine import engine, prompts, run, staggered
from tests.integration.test_quantization import GREEDY, text_ids  # noqa: F401 (a fixture)


def on_the_kernel(model) -> int:
    """Linear layers served by the kernel (0 where this machine cannot run it)."""
    return sum(getattr(module, "gemm", None) is not None for module in model.modules())


def test_a_bf16_engine_on_the_kernel_gives_each_request_its_solo_output(tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny", max_position_embeddings=512, seed=6)
    solo = engine(checkpoint, dtype="bfloat16", enable_prefix_caching=False)
    if not on_the_kernel(solo.runner.model):
        pytest.skip("this machine cannot run the AVX-512 BF16 kernel")
    prompt_list = prompts(16, seed=7)
    expected = [run(solo, {0: [("r", p, GREEDY)]})["r"] for p in prompt_list]
    out = run(engine(checkpoint, dtype="bfloat16"), staggered(prompt_list))
    assert [out[str(i)] for i in range(len(prompt_list))] == expected


def test_the_default_model_scores_as_on_onednn(default_checkpoint, text_ids):  # noqa: F811
    ids = text_ids[:512]
    ours = load_model(default_checkpoint, "bfloat16")
    if not on_the_kernel(ours):
        pytest.skip("this machine cannot run the AVX-512 BF16 kernel")
    assert on_the_kernel(ours) == 30 * 4 + 1  # every decoder projection and the LM head
    mine, theirs = perplexity(ours, ids), perplexity(load_model(default_checkpoint, "bfloat16", cpu_kernels=False), ids)
    print(f"perplexity {mine.perplexity:.3f} (kernel) vs {theirs.perplexity:.3f} (oneDNN), top-1 agreement "
          f"{mine.agreement(theirs):.3f}")
    assert abs(mine.perplexity / theirs.perplexity - 1) < 0.005
    assert mine.agreement(theirs) >= 0.95  # measured 0.978: two orders of bfloat16 rounding


@pytest.mark.parametrize("quantization, overrides", [
    ("none", {}), ("int8", {}), ("int4", {}),
    ("none", {"tie_word_embeddings": True}),
    ("int4", {"vocab_size": 250}),  # an LM head off the kernels (250 % 16): the step ends at the final norm
])
def test_decode_steps_in_one_call_match_the_layer_by_layer_path(tmp_path, quantization, overrides):
    """cpu_kernels.DecoderLayers runs the kernels the layers call one by one: the same logits and cache, bitwise,
    for sequences of different contexts in one step; a step with a prefill chunk takes the layer-by-layer path."""
    model = load_model(make_tiny_checkpoint(tmp_path / "tiny", max_position_embeddings=512, seed=3, **overrides),
                       "bfloat16", quantization=quantization, cache_dir=tmp_path)
    if model.decoder is None:
        pytest.skip("this machine cannot run llamaserve's CPU kernels")
    assert (model.decoder.head is None) == ("vocab_size" in overrides)
    arch, block_size, contexts = model.arch, 16, [5, 40, 17, 100]
    torch.manual_seed(0)
    kv = [(k.normal_(), v.normal_()) for k, v in allocate_kv_cache(
        arch.num_hidden_layers, 40, block_size, arch.num_key_value_heads, arch.head_dim, torch.bfloat16, "cpu")]
    tables = [[9 * i + b for b in range(9)][::-1] for i in range(len(contexts))]  # blocks out of order
    decode = AttentionMetadata.build([1] * len(contexts), [c + 1 for c in contexts], tables, block_size)
    ids, positions = torch.tensor([3, 77, 200, 41]), torch.tensor(contexts)
    calls = []
    run = model.decoder.run
    model.decoder.run = lambda *args: calls.append(len(args)) or run(*args)

    def step(ids, positions, meta, one_call: bool):
        caches = [(k.clone(), v.clone()) for k, v in kv]
        program, model.decoder = model.decoder, model.decoder if one_call else None
        logits = model(ids, positions, caches, meta)
        model.decoder = program
        return logits, caches

    (fused, fused_kv), (layered, layered_kv) = step(ids, positions, decode, True), step(ids, positions, decode, False)
    assert len(calls) == 1
    assert fused.shape == (len(contexts), arch.vocab_size) and fused.dtype == torch.float32
    assert torch.equal(fused, layered)
    assert all(torch.equal(a, b) for pair in zip(fused_kv, layered_kv) for a, b in zip(*pair))
    # A one-token chunk of a prompt that goes on is a decode to attention, but samples nothing.
    partly = AttentionMetadata.build([1] * len(contexts), [c + 1 for c in contexts], tables, block_size,
                                     sample=[True, False, True, True])
    (fused, _), (layered, _) = step(ids, positions, partly, True), step(ids, positions, partly, False)
    assert len(calls) == 2 and fused.shape[0] == 3 and torch.equal(fused, layered)
    mixed = AttentionMetadata.build([1, 3], [6, 3], tables[:2], block_size)
    step(torch.tensor([3, 5, 6, 7]), torch.tensor([5, 0, 1, 2]), mixed, True)
    assert len(calls) == 2  # the prefill chunk's step ran layer by layer
    with pytest.raises(IndexError):  # as the embedding's lookup would, and nothing written
        step(torch.tensor([3, 77, arch.vocab_size, 41]), positions, decode, True)


def test_no_decoder_call_without_the_kernels(tmp_path):
    model = load_model(make_tiny_checkpoint(tmp_path / "tiny"), "bfloat16", cpu_kernels=False, cache_dir=tmp_path)
    assert model.decoder is None
