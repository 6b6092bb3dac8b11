"""Step inputs: the staging buffer (one persistent buffer, typed views, growth), the flat indices of a step
against a per-token reference, the staged model inputs, and the tensor encoding tensor-parallel ranks get."""

import random

import numpy as np
import pytest
import torch

from llamaserve.engine.runner.group import HEADER_SIZE, STOP, decode, encode, payload_size, rank_device
from llamaserve.engine.runner.inputs import StagedInputs, StepInputs
from llamaserve.model.attention import AttentionMetadata, step_layout
from llamaserve.model.staging import ALIGN, StagingBuffer


def test_fields_come_back_typed_and_aligned():
    staging = StagingBuffer("cpu", capacity=64).begin()
    ids = staging.put([3, 1, 4])
    mask = staging.put([True, False], torch.bool)
    temperature = staging.put([[0.5], [2.0]], torch.float32)
    table, rows = staging.reserve((2, 3))
    rows[1, :2] = [7, 8]
    staging.send()
    assert ids.tensor().tolist() == [3, 1, 4] and ids.tensor().dtype == torch.int64
    assert mask.tensor().tolist() == [True, False] and mask.tensor().dtype == torch.bool
    assert temperature.tensor().shape == (2, 1) and temperature.tensor().tolist() == [[0.5], [2.0]]
    assert table.tensor().tolist() == [[0, 0, 0], [7, 8, 0]]
    assert all(field.start % ALIGN == 0 for field in (ids, mask, temperature, table))


def test_the_buffer_is_reused_step_after_step_and_grows_when_a_step_needs_more():
    staging = StagingBuffer("cpu", capacity=64)
    staging.begin()
    first = staging.put(list(range(4)))
    storage = staging.host_bytes.data_ptr()
    staging.send()
    assert first.tensor().tolist() == [0, 1, 2, 3]
    staging.begin()  # the next step writes from the start again, into the same memory
    again = staging.put([9])
    assert again.start == 0 and staging.host_bytes.data_ptr() == storage
    big = staging.put(list(range(100)))  # past the capacity: the buffer grows, what was put survives
    staging.send()
    assert staging.capacity >= 16 + 800
    assert again.tensor().tolist() == [9] and big.tensor().tolist() == list(range(100))


def test_on_the_cpu_the_device_tensors_are_the_host_buffer():
    staging = StagingBuffer("cpu").begin()
    field = staging.put([1, 2])
    staging.send()
    assert field.tensor().data_ptr() == staging.host_bytes.data_ptr() + field.start


def reference_layout(query_lens, seq_lens, block_tables, block_size, sample):
    """One token at a time, as the layout is defined."""
    positions, slots, token_seq_lens, logits = [], [], [], []
    flat = 0
    for q, s, table, wanted in zip(query_lens, seq_lens, block_tables, sample):
        for i in range(q):
            p = s - q + i
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
            token_seq_lens.append(s)
            flat += 1
        if wanted:
            logits.append(flat - 1)
    return positions, slots, token_seq_lens, logits


@pytest.mark.parametrize("seed", range(5))
def test_step_layout_matches_a_token_by_token_reference(seed):
    rng = random.Random(seed)
    block_size = rng.choice([4, 16])
    query_lens, seq_lens, tables, sample = [], [], [], []
    pool = list(range(500))
    rng.shuffle(pool)
    for _ in range(rng.randrange(1, 12)):
        q = rng.choice([1, 1, 1, rng.randrange(2, 40)])
        s = q + rng.randrange(0, 60)
        query_lens.append(q)
        seq_lens.append(s)
        tables.append([pool.pop() for _ in range(-(-s // block_size) + rng.randrange(0, 2))])  # maybe one spare
        sample.append(rng.random() < 0.8)
    layout = step_layout(query_lens, seq_lens, tables, block_size, sample)
    positions, slots, token_seq_lens, logits = reference_layout(query_lens, seq_lens, tables, block_size, sample)
    assert layout["positions"].tolist() == positions
    assert layout["slot_mapping"].tolist() == slots
    assert layout["token_seq_lens"].tolist() == token_seq_lens
    assert layout["logits_indices"].tolist() == logits
    assert layout["query_start_loc"].tolist() == [0, *np.cumsum(query_lens).tolist()]
    assert layout["decode_seqs"].tolist() == [i for i, q in enumerate(query_lens) if q == 1]
    assert layout["prefill_seqs"].tolist() == [i for i, q in enumerate(query_lens) if q > 1]
    for row, (s, table) in enumerate(zip(seq_lens, tables)):
        n = -(-s // block_size)
        assert layout["block_table"][row, :n].tolist() == table[:n]
        assert not layout["block_table"][row, n:].any()


def test_staged_inputs_hold_the_step_and_each_tokens_adapter_slot():
    inputs = StepInputs([5, 6, 7, 8], [3, 1], [3, 9], [[2], [4, 1, 3]], [True, True], lora_slots=[-1, 1])
    staging = StagingBuffer("cpu").begin()
    staged = StagedInputs(inputs, 4, staging)
    staging.send()
    step = staged.on_device()
    assert step.input_ids.tolist() == [5, 6, 7, 8] and step.positions.tolist() == [0, 1, 2, 8]
    assert step.lora_slots.tolist() == [-1, -1, -1, 1] and step.lora_active == 2
    expected = AttentionMetadata.build([3, 1], [3, 9], [[2], [4, 1, 3]], 4)
    for name in ("slot_mapping", "logits_indices", "block_table", "query_start_loc", "seq_lens_tensor"):
        assert torch.equal(getattr(step.meta, name), getattr(expected, name)), name
    base = StepInputs([5], [1], [1], [[0]], [True], lora_slots=[-1])
    staged = StagedInputs(base, 4, staging.begin())
    staging.send()
    assert staged.on_device().lora_slots is None  # no adapter in the step: the layers skip LoRA


def test_decode_steps_are_told_apart():
    assert StepInputs([1, 2], [1, 1], [5, 9], [[0], [1]], [True, True]).is_decode
    assert not StepInputs([1, 2, 3], [2, 1], [5, 9], [[0], [1]], [True, True]).is_decode  # a chunk
    assert not StepInputs([1], [1], [5], [[0]], [False]).is_decode  # a one-token chunk that samples nothing
    assert not StepInputs([], [], [], [], []).is_decode  # a keepalive


@pytest.mark.parametrize("inputs", [
    StepInputs([], [], [], [], []),  # rank 0's keepalive
    StepInputs([11, 12, 13, 14], [3, 1], [3, 40], [[7], [1, 2, 3, 4, 5]], [False, True]),
    StepInputs([1, 2], [1, 1], [17, 2], [[9, 8], [3]], [True, True], lora_slots=[0, -1],
               lora_loads=[(0, "/adapters/a")]),
], ids=["keepalive", "mixed", "adapters"])
def test_steps_travel_as_int64_tensors(inputs):
    header, payload = encode(inputs)
    assert header.dtype == payload.dtype == torch.int64 and header.shape == (HEADER_SIZE,)
    assert payload.numel() == payload_size(header)
    got = decode(header, payload)
    assert got.token_ids == inputs.token_ids and got.query_lens == inputs.query_lens
    assert got.seq_lens == inputs.seq_lens and got.sample == inputs.sample and got.lora_slots == inputs.lora_slots
    for row, table in zip(got.block_tables, inputs.block_tables):
        assert row[: len(table)] == table and not any(row[len(table):])  # padded with block 0, never read
    assert got.lora_loads == []  # the adapters to load follow as their own (rare) message
    assert bool(header[5]) == bool(inputs.lora_loads)


def test_stop_is_a_header_alone():
    header, payload = encode(None)
    assert header[0] == STOP and payload is None and decode(header, None) is None


def test_each_tensor_parallel_rank_gets_its_own_gpu():
    assert [rank_device("cuda", 4, r) for r in range(4)] == [torch.device("cuda", r) for r in range(4)]
    assert [rank_device("cuda:2", 2, r) for r in range(2)] == [torch.device("cuda", 2), torch.device("cuda", 3)]
    assert rank_device("cuda:3", 1, 0) == torch.device("cuda", 3)
    assert rank_device("cuda", 1, 0) == torch.device("cuda", 0)
    assert rank_device("cpu", 4, 3) == torch.device("cpu")
