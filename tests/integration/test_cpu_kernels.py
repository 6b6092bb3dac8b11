"""llamaserve's bfloat16 CPU kernel in whole models: an engine on it gives each request its solo greedy output in
any batch, and the default model on it scores the perplexity text as oneDNN's bfloat16 does."""

import pytest

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
