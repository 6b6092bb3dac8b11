"""The tensor-parallel group as the model runner sees it: joining it (rank 0 starts its host's other ranks), and
the step channel from rank 0 to the others.

Each step travels as int64 tensors over the group's CPU-side gloo group, two broadcasts: a fixed-size header
(what follows and how long it is), then one payload with the token ids, lengths, sample flags, adapter slots
and the block tables. Only a step that loads LoRA adapters (a rare control message: slot and folder) sends one
pickled object more. A header of kind STOP ends the workers; a step of no tokens is rank 0's keepalive.
"""

import logging
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from llamaserve.config import EngineConfig
from llamaserve.engine.faults import describe
from llamaserve.engine.runner.inputs import StepInputs
from llamaserve.engine.workers import WorkerGroup, init_process_group

log = logging.getLogger(__name__)

STOP, STEP = 0, 1
# header: kind, num_tokens, num_seqs, block table width, has adapter slots, has adapters to load
HEADER_SIZE = 6


def encode(inputs: StepInputs | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(header [HEADER_SIZE], payload [n]) int64 for a step; None (stop) has no payload."""
    if inputs is None:
        return torch.tensor([STOP] + [0] * (HEADER_SIZE - 1)), None
    num_seqs = len(inputs.query_lens)
    width = max((len(t) for t in inputs.block_tables), default=0)
    table = np.zeros((num_seqs, width), dtype=np.int64)  # [num_seqs, width], padded with 0
    for row, blocks in enumerate(inputs.block_tables):
        table[row, : len(blocks)] = blocks
    parts = [inputs.token_ids, inputs.query_lens, inputs.seq_lens, inputs.sample]
    if inputs.lora_slots:
        parts.append(inputs.lora_slots)
    payload = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts] + [table.reshape(-1)])
    header = [STEP, len(inputs.token_ids), num_seqs, width, int(bool(inputs.lora_slots)), int(bool(inputs.lora_loads))]
    return torch.tensor(header), torch.from_numpy(payload)


def payload_size(header: torch.Tensor) -> int:
    _, num_tokens, num_seqs, width, has_slots, _ = header.tolist()
    return num_tokens + num_seqs * (3 + has_slots + width)


def decode(header: torch.Tensor, payload: torch.Tensor | None) -> StepInputs | None:
    """The StepInputs of `encode` (without lora_loads, which follow as their own message); None: stop.
    Block table rows keep their padding, which the model never reads (each row holds its ceil(seq_len /
    block_size) blocks first)."""
    kind, num_tokens, num_seqs, width, has_slots, _ = header.tolist()
    if kind == STOP:
        return None
    values = payload.numpy()
    cuts = np.cumsum([num_tokens] + [num_seqs] * (3 + has_slots))
    token_ids, query_lens, seq_lens, sample, *rest = np.split(values, cuts)
    table = rest[-1].reshape(num_seqs, width)
    return StepInputs(token_ids.tolist(), query_lens.tolist(), seq_lens.tolist(), table.tolist(),
                      sample.astype(bool).tolist(), rest[0].tolist() if has_slots else [])


def rank_device(device: str, tensor_parallel_size: int, local_rank: int) -> torch.device:
    """A rank's own device: with tensor parallelism on CUDA, "cuda" gives a node's ranks GPUs 0, 1, ... and
    "cuda:N" GPUs N, N + 1, ... (one GPU per rank either way); one rank keeps `device` as it is."""
    device = torch.device(device)
    if device.type != "cuda" or (tensor_parallel_size == 1 and device.index is not None):
        return device
    return torch.device("cuda", (device.index or 0) + local_rank)


class StepGroup:
    """One rank's membership of the tensor-parallel group."""

    def __init__(self, config: EngineConfig, rank: int, device: torch.device,
                 on_worker_death: Callable[[str], None] | None = None):
        """Rank 0 starts node 0's other ranks (fixing the rendezvous port: see `config`); every rank then
        joins. `on_worker_death(reason)` runs (on a watcher thread) when a local worker exits unasked, by
        default logging it and failing every later step (`failure`)."""
        self.rank = rank
        self.workers: WorkerGroup | None = None
        self.failure: str | None = None  # rank 0: why a worker died
        if rank == 0:
            self.workers, config = WorkerGroup.start(config, on_worker_death or self._worker_died)
        self.config = config
        self._threads_before = torch.get_num_threads()
        if device.type == "cpu":  # the ranks on a host share its cores instead of each taking all
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // config.parallel.ranks_per_node))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.group = init_process_group(config, rank, device)

    def _worker_died(self, reason: str) -> None:
        log.error("%s", reason)
        self.failure = reason

    def send(self, inputs: StepInputs | None) -> None:
        """Rank 0: a step (or None: stop) to every other rank."""
        header, payload = encode(inputs)
        dist.broadcast(header, src=0, group=self.group)
        if payload is not None:
            if payload.numel():  # a keepalive has none
                dist.broadcast(payload, src=0, group=self.group)
            if inputs.lora_loads:
                dist.broadcast_object_list([inputs.lora_loads], src=0, group=self.group)

    def receive(self) -> StepInputs | None:
        """The other ranks: the next step rank 0 sends; None when it says stop."""
        header = torch.empty(HEADER_SIZE, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.group)
        if header[0] == STOP:
            return None
        payload = torch.empty(payload_size(header), dtype=torch.int64)
        if payload.numel():
            dist.broadcast(payload, src=0, group=self.group)
        inputs = decode(header, payload)
        if header[5]:
            loads = [None]
            dist.broadcast_object_list(loads, src=0, group=self.group)
            inputs.lora_loads = loads[0]
        return inputs

    def min(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        count = torch.tensor([value])
        dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.group)
        return int(count)

    def shutdown(self) -> None:
        """Rank 0: stop the workers (unless one died) and wait for them; every rank: leave the group."""
        if self.workers is not None:
            if self.failure is None:
                try:
                    self.send(None)
                except RuntimeError as e:  # a remote rank already gone: nobody left to tell
                    log.warning("could not tell every rank to stop: %s", describe(e))
            self.workers.join()
            self.workers = None
        dist.destroy_process_group()
        torch.set_num_threads(self._threads_before)
