"""One step's inputs twice over: as the scheduler chose them, in flat lists that every tensor-parallel rank
receives alike (StepInputs), and as the device tensors the model reads (ModelInputs), staged into the step's
buffer with every flat index computed once on the host (llamaserve.model.attention.step_layout)."""

from dataclasses import dataclass, field

import numpy as np
import torch

from llamaserve.engine.scheduler import ScheduledRequest
from llamaserve.model.attention import AttentionMetadata, StagedMetadata
from llamaserve.model.staging import StagingBuffer


@dataclass
class StepInputs:
    """Everything a rank needs to run one step; each token's position follows from the lengths (a request's
    new tokens sit at positions seq_len - query_len .. seq_len - 1)."""

    token_ids: list[int]  # flat, every scheduled request's new tokens in order
    query_lens: list[int]  # new tokens per request
    seq_lens: list[int]  # tokens per request once this step's are cached
    block_tables: list[list[int]]  # each request's cache blocks, at least ceil(seq_len / block_size) of them
    sample: list[bool]  # whether each request samples a token after this step
    lora_slots: list[int] = field(default_factory=list)  # each request's adapter slot, -1 for the base; [] none
    lora_loads: list[tuple[int, str]] = field(default_factory=list)  # (slot, adapter folder) to load first

    @classmethod
    def from_step(cls, scheduled: list[ScheduledRequest]) -> "StepInputs":
        inputs = cls([], [], [], [], [])
        for item in scheduled:
            end = item.start + item.num_new_tokens
            inputs.token_ids.extend(item.request.all_token_ids[item.start : end])
            inputs.query_lens.append(item.num_new_tokens)
            inputs.seq_lens.append(end)
            inputs.block_tables.append(item.block_table)
            inputs.sample.append(item.sample)
        return inputs

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def uses_adapters(self) -> bool:
        return any(slot >= 0 for slot in self.lora_slots)

    @property
    def is_decode(self) -> bool:
        """Every request computes one new token and samples the next: the steps a CUDA graph replays."""
        return 0 < len(self.query_lens) == len(self.token_ids) and all(self.sample)


@dataclass
class ModelInputs:
    """One step's tensors on the device (views of the staging buffer: valid for this step only)."""

    input_ids: torch.Tensor  # [num_tokens] long
    positions: torch.Tensor  # [num_tokens] long
    meta: AttentionMetadata
    lora_slots: torch.Tensor | None  # [num_tokens] long: each token's adapter slot, -1 the base; None: no adapter
    lora_active: int  # slots 0 .. lora_active - 1 are in use this step


class StagedInputs:
    """StepInputs written into the step's staging buffer; `on_device()` once the buffer is sent."""

    def __init__(self, inputs: StepInputs, block_size: int, staging: StagingBuffer):
        self.input_ids = staging.put(inputs.token_ids)
        self.meta = StagedMetadata(inputs.query_lens, inputs.seq_lens, inputs.block_tables, block_size,
                                   inputs.sample, staging)
        self.lora_slots, self.lora_active = None, 0
        if inputs.uses_adapters:
            self.lora_slots = staging.put(np.repeat(inputs.lora_slots, inputs.query_lens))  # [num_tokens]
            self.lora_active = max(inputs.lora_slots) + 1

    def on_device(self) -> ModelInputs:
        return ModelInputs(self.input_ids.tensor(), self.meta.positions, self.meta.on_device(),
                           None if self.lora_slots is None else self.lora_slots.tensor(), self.lora_active)
