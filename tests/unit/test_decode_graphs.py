"""The decode graph runner on the CPU: the Triton backend through its interpreter, and in place of a CUDA graph
a stand-in that replays the captured forward eagerly on the static buffers with the plan made at capture, as a
graph would (every host decision frozen at capture, every length read from the buffers). Decode batches padded
to their bucket give the eager step's logits and K/V cache, padded rows write nothing, and only decode steps
without adapters are replayed. CUDA itself (capture, memory, replay speed) is checked by bench/gpu_check.py.

As in test_triton_attention, the interpreter must be on before triton is imported, so the checks run in a
child process that reports JSON lines.
"""

import json
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

from llamaserve.engine.runner.graphs import batch_sizes
from llamaserve.engine.runner.inputs import StepInputs
from tests.unit.child import run_child

BLOCK_SIZE = 8
MAX_NUM_SEQS = 6  # buckets 1, 2, 4, 6
MAX_MODEL_LEN = 600  # long enough that the graph plan splits every context, leaving empty partitions


def test_buckets_are_powers_of_two_then_max_num_seqs():
    assert batch_sizes(1) == [1]
    assert batch_sizes(6) == [1, 2, 4, 6]
    assert batch_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


@pytest.fixture(scope="module")
def results() -> dict:
    return run_child("tests.unit.test_decode_graphs", interpret=True, timeout=900)


def test_padded_replays_match_eager_decode_steps(results):
    result = results["replays"]
    assert "error" not in result, result.get("error")
    assert result["buckets"] == [1, 2, 4, 6] and result["plan_splits"] > 1
    for case in result["steps"]:
        assert case["max_logit_diff"] <= 1e-5, case
        assert case["cache_equal"], case  # the real tokens' K/V written, the padded rows' nowhere


def test_only_decode_steps_without_adapters_are_replayed(results):
    assert results["serves"] == {"decode": True, "prefill": False, "one-token-chunk": False, "adapters": False,
                                 "too-many": False}


# ---- the child process --------------------------------------------------------------------------------


class EagerReplay:
    """A CUDA graph's contract, eagerly: built once from the forward, replayed on the buffers' contents."""

    @staticmethod
    def new_pool():
        return None

    def __init__(self, forward, pool):
        self.forward = forward
        self.output = forward()

    def replay(self) -> torch.Tensor:
        self.output = self.forward()
        return self.output


def replays() -> dict:
    from llamaserve.engine.runner.graphs import DecodeGraphs
    from llamaserve.engine.runner.inputs import StagedInputs
    from llamaserve.model.attention import allocate_kv_cache
    from llamaserve.model.loader import load_model
    from llamaserve.model.staging import StagingBuffer
    from tests.conftest import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_tiny_checkpoint(Path(tmp), seed=4, max_position_embeddings=1024)
        model = load_model(checkpoint, "float32", attention_backend="triton")
    arch = model.arch
    num_blocks = 64

    def cache():
        torch.manual_seed(1)  # earlier steps' K/V everywhere, the same in both copies
        kv = allocate_kv_cache(arch.num_hidden_layers, num_blocks, BLOCK_SIZE, arch.num_key_value_heads,
                               arch.head_dim, torch.float32, "cpu")
        for k, v in kv:
            k.normal_()
            v.normal_()
        return kv

    eager_kv, graph_kv = cache(), cache()
    graphs = DecodeGraphs(model, graph_kv, BLOCK_SIZE, MAX_NUM_SEQS, MAX_MODEL_LEN, graph=EagerReplay)
    graphs.capture()
    staging = StagingBuffer("cpu")
    steps = []
    pool = list(range(num_blocks))[::-1]
    lengths = [3, 17, 9, 40, 1, 25]  # contexts before the step, mid-block and block-aligned
    tables = [[pool.pop() for _ in range(-(-(n + 4) // BLOCK_SIZE))] for n in lengths]
    for size in (1, 3, 5, 6, 2):  # padded to 1, 4, 6, 6, 2
        seqs = list(range(size))
        for seq in seqs:
            lengths[seq] += 1
        inputs = StepInputs([7 + seq for seq in seqs], [1] * size, [lengths[s] for s in seqs],
                            [tables[s] for s in seqs], [True] * size)
        staged = StagedInputs(inputs, BLOCK_SIZE, staging.begin())
        staging.send()
        step = staged.on_device()
        eager = model(step.input_ids, step.positions, eager_kv, step.meta)
        graph = graphs.run(inputs, step).clone()
        steps.append({"size": size, "max_logit_diff": (eager - graph).abs().max().item(),
                      "cache_equal": all(torch.equal(a, b) for pa, pb in zip(eager_kv, graph_kv)
                                         for a, b in zip(pa, pb))})
    plan = graphs.graphs[1][2]
    return {"buckets": graphs.sizes, "plan_splits": plan.num_splits, "steps": steps}


def serves() -> dict:
    from llamaserve.engine.runner.graphs import DecodeGraphs

    class Backend:
        name = "stand-in"

        def graph_plan(self, meta):
            return None

    class Model:
        def attention_for(self, device, dtype):
            return Backend()

    kv = [(torch.zeros(1, BLOCK_SIZE, 1, 4), torch.zeros(1, BLOCK_SIZE, 1, 4))]
    graphs = DecodeGraphs(Model(), kv, BLOCK_SIZE, 4, 64)
    cases = {
        "decode": StepInputs([1, 2], [1, 1], [5, 6], [[0], [0]], [True, True]),
        "prefill": StepInputs([1, 2, 3], [2, 1], [5, 6], [[0], [0]], [True, True]),
        "one-token-chunk": StepInputs([1], [1], [5], [[0]], [False]),
        "adapters": StepInputs([1, 2], [1, 1], [5, 6], [[0], [0]], [True, True], lora_slots=[-1, 0]),
        "too-many": StepInputs([1] * 5, [1] * 5, [5] * 5, [[0]] * 5, [True] * 5),
    }
    return {name: graphs.serves(inputs) for name, inputs in cases.items()}


def child() -> None:
    for name, check in (("replays", replays), ("serves", serves)):
        try:
            result = check()
        except Exception:
            result = {"error": traceback.format_exc()}
        print(json.dumps({name: result}), flush=True)


if __name__ == "__main__":
    child()
