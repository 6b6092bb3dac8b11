"""Tensor parallelism on CPU with real gloo worker processes: every split gives one rank's greedy tokens
(through the engine, with continuous batching) and its logits; each rank loads only its slices."""

import pytest
import torch

from llamaserve.config import EngineConfig
from llamaserve.engine.core import EngineCore
from llamaserve.engine.model_runner import StepInputs
from llamaserve.model.architecture import ModelArchitecture
from llamaserve.model.llama import LlamaForCausalLM
from llamaserve.model.loader import SafetensorsCheckpoint
from llamaserve.model.sharding import TensorParallel
from llamaserve.plan import weight_params_per_rank
from llamaserve.sampling_params import SamplingParams
from llamaserve.tokenizer import Tokenizer
from tests.conftest import make_tiny_checkpoint
from tests.integration.test_engine import prompts, run, staggered

LOGITS_TOLERANCE = 1e-4  # float32; partial sums are added in another order across ranks


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
    """8 query heads over 2 KV heads: tp=2 splits the KV heads, tp=4 replicates each on two ranks."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gqa"), seed=5, num_attention_heads=8,
                                num_key_value_heads=2, max_position_embeddings=512)


def engine(checkpoint, tp: int, block_size: int = 4) -> EngineCore:
    return EngineCore(EngineConfig.from_options(
        model=str(checkpoint), tensor_parallel_size=tp, num_blocks=256, block_size=block_size, max_num_seqs=16,
        max_num_batched_tokens=128, max_model_len=512,
    ))


def two_steps_of_logits(core: EngineCore, prompt_list: list[list[int]]) -> list[torch.Tensor]:
    """A batched prefill of every prompt, then one decode step for all, straight through the runner."""
    block_size = core.runner.block_size
    tables = [list(range(i * 30, (i + 1) * 30)) for i in range(len(prompt_list))]
    lens = [len(p) for p in prompt_list]
    prefill = StepInputs([t for p in prompt_list for t in p], lens, lens, tables, [True] * len(lens))
    assert max(lens) < 30 * block_size
    first = core.runner.run_model(prefill)
    decode = StepInputs(first.argmax(-1).tolist(), [1] * len(lens), [n + 1 for n in lens], tables,
                        [True] * len(lens))
    return [first, core.runner.run_model(decode)]


def run_split(checkpoint, tp: int, prompt_list, params, block_size: int = 4):
    core = engine(checkpoint, tp, block_size)
    try:
        tokens = run(core, staggered(prompt_list, params))
        return tokens, two_steps_of_logits(core, prompt_list)
    finally:
        core.shutdown()


def assert_same_as_one_rank(checkpoint, tp: int, prompt_list, params, block_size: int = 4) -> None:
    tokens_1, logits_1 = run_split(checkpoint, 1, prompt_list, params, block_size)
    tokens_n, logits_n = run_split(checkpoint, tp, prompt_list, params, block_size)
    assert tokens_n == tokens_1
    for one, split in zip(logits_1, logits_n):
        assert split.shape == one.shape
        difference = (split - one).abs().max().item()
        print(f"tp={tp}: max |logit difference| {difference:.2e}")
        assert difference < LOGITS_TOLERANCE


@pytest.mark.parametrize("tp", [2, 4], ids=["tp2-kv-heads-split", "tp4-kv-heads-replicated"])
def test_tiny_gqa_split_matches_one_rank(gqa_checkpoint, tp):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert_same_as_one_rank(gqa_checkpoint, tp, prompts(8, seed=11), greedy)


def test_default_model_split_in_three_matches_one_rank(default_checkpoint):
    """SmolLM2-135M: 9 query heads and 3 KV heads, so tp=3 puts 3 query heads and 1 KV head on each rank."""
    tokenizer = Tokenizer.from_checkpoint(default_checkpoint)
    questions = ["What is the capital of France?", "Name three primary colours.", "What is 7 times 8?",
                 "Write a haiku about rain.", "Who wrote Hamlet?", "Define photosynthesis briefly.",
                 "What is the boiling point of water?", "Translate 'good morning' into Spanish."]
    prompt_list = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    assert_same_as_one_rank(default_checkpoint, 3, prompt_list, greedy, block_size=16)


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_reads_only_its_slices(gqa_checkpoint, tp):
    arch = ModelArchitecture.from_checkpoint(gqa_checkpoint)
    full = SafetensorsCheckpoint(gqa_checkpoint)
    for rank in range(tp):
        with torch.device("meta"):
            model = LlamaForCausalLM(arch, TensorParallel(rank, tp))
        model = model.to_empty(device="cpu")
        checkpoint = SafetensorsCheckpoint(gqa_checkpoint)
        model.load_weights(checkpoint)
        # What came off the disk is this rank's shard (replicated KV heads and norms included), no more.
        assert checkpoint.bytes_read == weight_params_per_rank(arch, tp) * 4
        layer = model.model.layers[1]
        q_rows, kv_rows = 8 // tp * 8, 8  # head_dim 8; one KV head per rank either way
        assert layer.self_attn.qkv_proj.weight.shape == (q_rows + 2 * kv_rows, 64)
        assert layer.self_attn.o_proj.weight.shape == (64, q_rows)
        assert layer.mlp.down_proj.weight.shape == (64, 128 // tp)
        assert model.model.embed_tokens.weight.shape == (256 // tp, 64)
        kv_head = rank * 2 // tp  # tp=4: ranks 0, 1 hold KV head 0; ranks 2, 3 hold KV head 1
        k = full.read("model.layers.1.self_attn.k_proj.weight")
        assert torch.equal(layer.self_attn.qkv_proj.weight[q_rows : q_rows + kv_rows], k[kv_head * 8 : kv_head * 8 + 8])
        down = full.read("model.layers.1.mlp.down_proj.weight")
        width = 128 // tp
        assert torch.equal(layer.mlp.down_proj.weight, down[:, rank * width : (rank + 1) * width])


def test_a_split_the_heads_do_not_allow_is_refused_before_any_worker_starts(gqa_checkpoint):
    with pytest.raises(ValueError, match="does not divide num_attention_heads"):
        engine(gqa_checkpoint, 3)
