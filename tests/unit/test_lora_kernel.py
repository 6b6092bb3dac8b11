"""llamaserve's LoRA delta kernel (model/csrc/lora.c) against the formula in float64 and against the torch stack
it replaces on CPU: random stacks, batches mixing slots and base tokens, float32 and bfloat16, one token to a
prefill's worth; a token's delta is the same bits in any batch and on any number of threads."""

import logging

import pytest
import torch

from llamaserve.model import cpu_kernels
from llamaserve.model.lora import LoraContext, LoraStack, SegmentedLoraStack
from tests.conftest import built_kernel


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return built_kernel(cpu_kernels.lora_delta, tmp_path_factory.mktemp("cache"))


def stacks(kernel, dtype, part_rows, in_features, rank=16, num_slots=4, seed=0):
    """A SegmentedLoraStack and a LoraStack holding the same random adapters (slot 2 loaded, then cleared), and
    those adapters: (slot, part) -> (A [r, in], B [rows, r])."""
    torch.manual_seed(seed)
    out_features = sum(rows for _, rows in part_rows)
    context = LoraContext(dtype)
    ours = SegmentedLoraStack(context, kernel, num_slots, rank, part_rows, in_features, out_features, dtype)
    theirs = LoraStack(context, num_slots, rank, part_rows, in_features, out_features, dtype, torch.device("cpu"))
    weights = {}
    for slot in range(num_slots):
        r = rank if slot % 2 == 0 else max(rank // 2, 1)  # an adapter of a lower rank than the slots'
        for part, (_, rows) in enumerate(part_rows):
            a, b = torch.randn(r, in_features).to(dtype), (torch.randn(rows, r) / r).to(dtype)
            ours.set(slot, part, a, b)
            theirs.set(slot, part, a, b)
            weights[(slot, part)] = a, b
    ours.clear(2)
    theirs.clear(2)
    return context, ours, theirs, {key: ab for key, ab in weights.items() if key[0] != 2}


def formula(weights, part_rows, y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, magnitude: bool = False):
    """y + each token's own slot's B @ (A @ x), per part, in float64 from the adapters' values; `magnitude`: also
    the same sums of the terms' absolute values (what bounds float32 rounding in any order)."""
    y, size = y.double().clone(), y.double().abs()
    for t, s in enumerate(slots.tolist()):
        for part, (offset, rows) in enumerate(part_rows):
            if (s, part) in weights:
                a, b = (w.double() for w in weights[(s, part)])
                y[t, offset : offset + rows] += b @ (a @ x[t].double())
                size[t, offset : offset + rows] += b.abs() @ (a.abs() @ x[t].double().abs())
    return (y, size) if magnitude else y


def run(stack, y, x, slots):
    stack.context.set(slots, int(slots.max()) + 1 if slots.numel() else 0)
    return stack.add_to(y.clone(), x)


SHAPES = [  # (part rows, in features): one part, q/k/v, gate/up; inputs over several 256-wide chunks; parts
    ([(0, 576)], 1536),  # whose rows are not a multiple of 64 or of 16; odd inputs
    ([(0, 192), (192, 64), (256, 64)], 576),
    ([(0, 80), (80, 48), (128, 48)], 64),
    ([(0, 70), (70, 70)], 100),
    ([(0, 24)], 33),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("part_rows,in_features", SHAPES)
@pytest.mark.parametrize("tokens,rank", [(1, 16), (5, 16), (16, 16), (512, 16), (16, 8), (7, 24)])
def test_matches_the_formula_and_the_torch_stack(kernel, dtype, part_rows, in_features, tokens, rank):
    context, ours, theirs, weights = stacks(kernel, dtype, part_rows, in_features, rank, seed=tokens)
    out_features = sum(rows for _, rows in part_rows)
    x, y = torch.randn(tokens, in_features).to(dtype), torch.randn(tokens, out_features).to(dtype)
    slots = torch.randint(-1, 4, (tokens,))
    slots[0] = 0  # at least one adapter token
    got = run(ours, y, x, slots)
    expected, size = formula(weights, part_rows, y, x, slots, magnitude=True)
    torch_stack = run(theirs, y, x, slots)
    base = slots < 0
    assert torch.equal(got[base], y[base])  # base tokens untouched
    if dtype == torch.float32:
        assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-4), (got.double() - expected).abs().max()
        assert torch.allclose(got, torch_stack, rtol=1e-5, atol=1e-4)
    else:  # float32 sums, then one rounding to bfloat16: within one unit in the last place beside the sums' error
        ulp = 2.0 ** (torch.frexp(expected.float()).exponent.double() - 8)
        assert ((got.double() - expected).abs() <= ulp + 2**-16 * size).all()
        # torch's matmuls round h to bfloat16 and the delta before the add: close to ours beside the delta's size
        assert (got.double() - torch_stack.double()).abs().max() <= 2**-6 * (expected - y.double()).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_gets_the_same_bits_in_any_batch_and_on_any_threads(kernel, dtype):
    part_rows, in_features = [(0, 192), (192, 64), (256, 64)], 576
    context, ours, _, _ = stacks(kernel, dtype, part_rows, in_features, seed=7)
    torch.manual_seed(8)
    x, y = torch.randn(1, in_features).to(dtype), torch.randn(1, 320).to(dtype)
    alone = run(ours, y, x, torch.tensor([3]))
    threads = torch.get_num_threads()
    for m in (1, 5, 6, 7, 16, 100):
        others_x, others_y = torch.randn(m, in_features).to(dtype), torch.randn(m, 320).to(dtype)
        others_slots = torch.randint(-1, 4, (m,))
        for at in (0, m // 2, m):
            batch_x = torch.cat([others_x[:at], x, others_x[at:]])
            batch_y = torch.cat([others_y[:at], y, others_y[at:]])
            batch_slots = torch.cat([others_slots[:at], torch.tensor([3]), others_slots[at:]])
            for n in {1, threads}:
                torch.set_num_threads(n)
                try:
                    got = run(ours, batch_y, batch_x, batch_slots)
                finally:
                    torch.set_num_threads(threads)
                assert torch.equal(got[at], alone[0]), (m, at, n)


def test_padded_rows_strided_input_and_no_adapter_tokens(kernel):
    context, ours, _, weights = stacks(kernel, torch.float32, [(0, 64)], 96, seed=9)
    x, y = torch.randn(8, 200), torch.randn(8, 64)  # 5 tokens, padded to 8 rows as a packed matmul's
    view = x[:, 40:136]  # rows 200 apart: read in place
    slots = torch.tensor([0, -1, 1, 3, 0])
    got = run(ours, y, view, slots)
    assert torch.equal(got, run(ours, y, view.contiguous(), slots))
    assert torch.equal(got[5:], y[5:])  # the padding rows are not the step's tokens
    assert torch.allclose(got[:5].double(), formula(weights, [(0, 64)], y[:5], view[:5], slots), rtol=1e-5, atol=1e-4)
    assert torch.equal(run(ours, y, view, torch.tensor([-1, -1, -1])), y)
    context.set(None, 0)
    assert torch.equal(ours.add_to(y.clone(), view), y)


def test_no_compiler_means_torch_and_a_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "cpu_flags", set)
    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert cpu_kernels.lora_delta(tmp_path / "cache") is None
    assert "LoRA deltas run on torch" in caplog.text and "the CPU lacks avx512bw, avx512f, avx512vl" in caplog.text
