"""Rank 0's sampling across steps: each seeded request's random generator, penalty counts kept on the device,
and the step's one device-to-host copy of what was sampled.

A step's sampling tensors are staged with its model inputs, before the forward pass (`stage`); `sample` then
runs the batched sampler on the logits, advances the penalty counts by the sampled tokens on the device, and
brings the tokens (and logprobs, when a request asked) to the host in one copy.
"""

from dataclasses import dataclass

import numpy as np
import torch

from llamaserve.engine.messages import TokenLogprobs
from llamaserve.engine.request import Request
from llamaserve.model.sampler import Sampler, SamplingBatch, StagedSampling
from llamaserve.model.staging import Staged, StagingBuffer


@dataclass
class StagedPenalties:
    rows: Staged  # [num_pen] long: each penalty row's row of PenaltyCounts
    # Rows (re)built this step: (rows, then flat (row, token) pairs of their outputs and of their prompts)
    fresh: tuple[Staged, Staged, Staged, Staged, Staged] | None = None


class PenaltyCounts:
    """The output-token counts and prompt-token presence of the requests that use penalties, one row per request
    on the device. A row is built from the request's token lists when it first samples (again after a
    preemption), then advanced by each step's sampled tokens without leaving the device; no step rebuilds
    them from Python lists."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.counts = torch.zeros(rows, vocab_size, device=device)  # [rows, vocab] float32: output token counts
        self.in_prompt = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)  # [rows, vocab]
        self.row_of: dict[str, int] = {}  # request id -> its row
        self._free = list(range(rows - 1, -1, -1))  # lowest first
        self._one = torch.ones((), device=device)

    def _take(self, request_id: str) -> int:
        if not self._free:  # more penalized requests hold rows than max_num_seqs (preempted ones): grow
            rows = len(self.counts)
            self.counts = torch.cat([self.counts, torch.zeros_like(self.counts)])
            self.in_prompt = torch.cat([self.in_prompt, torch.zeros_like(self.in_prompt)])
            self._free = list(range(2 * rows - 1, rows - 1, -1))
        row = self._free.pop()
        self.row_of[request_id] = row
        return row

    def release(self, request_id: str) -> None:
        row = self.row_of.pop(request_id, None)
        if row is not None:
            self._free.append(row)

    def stage(self, requests: list[Request], staging: StagingBuffer) -> StagedPenalties:
        rows, fresh = [], []
        for request in requests:
            row = self.row_of.get(request.request_id)
            if row is None:
                row = self._take(request.request_id)
                fresh.append((row, request))
            rows.append(row)
        staged = StagedPenalties(staging.put(rows))
        if fresh:
            new_rows = [row for row, _ in fresh]
            outputs = [r.output_token_ids for _, r in fresh]
            prompts = [r.prompt_token_ids for _, r in fresh]
            staged.fresh = (staging.put(new_rows),
                            staging.put(np.repeat(new_rows, [len(t) for t in outputs])),
                            staging.put(np.concatenate([np.asarray(t, dtype=np.int64) for t in outputs])),
                            staging.put(np.repeat(new_rows, [len(t) for t in prompts])),
                            staging.put(np.concatenate([np.asarray(t, dtype=np.int64) for t in prompts])))
        return staged

    def gather(self, staged: StagedPenalties, with_seen: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output counts [num_pen, vocab] float32, token seen in the prompt or the output [num_pen, vocab] bool
        or None) of the staged rows, building the fresh ones first."""
        if staged.fresh is not None:
            new_rows, out_rows, out_tokens, prompt_rows, prompt_tokens = (s.tensor() for s in staged.fresh)
            self.counts.index_fill_(0, new_rows, 0)
            self.counts.index_put_((out_rows, out_tokens), self._one, accumulate=True)
            self.in_prompt.index_fill_(0, new_rows, False)
            self.in_prompt.index_put_((prompt_rows, prompt_tokens), self._one.bool())
        rows = staged.rows.tensor()
        counts = self.counts.index_select(0, rows)
        return counts, (self.in_prompt.index_select(0, rows) | (counts > 0)) if with_seen else None

    def advance(self, staged: StagedPenalties, token_ids: torch.Tensor) -> None:
        """token_ids: [num_pen] long on the device, the token each staged row sampled."""
        self.counts.index_put_((staged.rows.tensor(), token_ids), self._one, accumulate=True)


class HostCopy:
    """The step's one device-to-host copy: into a pinned buffer, then a wait on an event for that copy alone
    (no device-wide synchronisation, which torch.cuda.set_sync_debug_mode would flag). On the CPU, tolist()."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._buffer = torch.empty(1024, dtype=torch.float64, pin_memory=self.cuda)
        self._done = torch.cuda.Event() if self.cuda else None

    def fetch(self, values: torch.Tensor) -> list:
        """values: 1-D int64 or float64."""
        if not self.cuda:
            return values.tolist()
        if values.numel() > self._buffer.numel():
            self._buffer = torch.empty(2 * values.numel(), dtype=torch.float64, pin_memory=True)
        host = self._buffer.view(values.dtype)[: values.numel()]
        host.copy_(values, non_blocking=True)
        self._done.record()
        self._done.synchronize()
        return host.tolist()


@dataclass
class StagedStep:
    requests: list[Request]  # the step's sampling requests, one per row
    batch: StagedSampling
    penalties: StagedPenalties | None


class SamplingState:
    def __init__(self, vocab_size: int, max_num_seqs: int, device: torch.device):
        """On CUDA the penalty counts are allocated now (before the KV cache is sized); elsewhere when a request
        first uses a penalty."""
        self.vocab_size, self.max_num_seqs, self.device = vocab_size, max_num_seqs, device
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own random streams
        self._penalties = PenaltyCounts(max_num_seqs, vocab_size, device) if device.type == "cuda" else None
        self.host = HostCopy(device)

    @property
    def penalties(self) -> PenaltyCounts:
        if self._penalties is None:
            self._penalties = PenaltyCounts(self.max_num_seqs, self.vocab_size, self.device)
        return self._penalties

    def generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        generator = self.generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(self.device).manual_seed(seed)
            self.generators[request.request_id] = generator
        return generator

    def release(self, request_id: str) -> None:
        """A finished request: its generator and penalty row go."""
        self.generators.pop(request_id, None)
        if self._penalties is not None:
            self._penalties.release(request_id)

    def preempted(self, request_ids: list[str]) -> None:
        """Preempted requests give their penalty rows back; each is rebuilt when the request samples again."""
        if self._penalties is not None:
            for request_id in request_ids:
                self._penalties.release(request_id)

    def stage(self, requests: list[Request], constrained: list[int], staging: StagingBuffer) -> StagedStep:
        """`constrained`: the rows of `requests` with a grammar."""
        params = [r.sampling_params for r in requests]
        batch = SamplingBatch.stage(params, [self.generator(r) for r in requests], self.vocab_size, staging,
                                    constrained)
        penalties = None
        if batch.penalty_rows:
            penalties = self.penalties.stage([requests[row] for row in batch.penalty_rows], staging)
        return StagedStep(requests, batch, penalties)

    def sample(self, logits: torch.Tensor, staged: StagedStep, bitmask: torch.Tensor | None
               ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: [num_sampling, vocab]; `bitmask`: the constrained rows' allowed tokens. Returns each row's
        token and its logprobs (None where not asked)."""
        counts = seen = None
        if staged.penalties is not None:
            counts, seen = self.penalties.gather(staged.penalties, staged.batch.use_repetition)
        batch = staged.batch.on_device(counts, seen, bitmask)
        out = self.sampler(logits, batch)
        if staged.penalties is not None:
            self.penalties.advance(staged.penalties, out.token_ids.index_select(0, batch.penalty_rows))
        if out.logprobs is None:
            return self.host.fetch(out.token_ids), [None] * len(staged.requests)
        values, ids = out.top_logprobs  # each [num_sampling, max_logprobs]
        packed = torch.cat([out.token_ids.double(), out.logprobs.double(), values.double().flatten(),
                            ids.double().flatten()])  # float64 holds every token id and float32 value exactly
        n, k = len(staged.requests), values.shape[1]
        host = self.host.fetch(packed)
        token_ids, logprobs = [int(t) for t in host[:n]], host[n : 2 * n]
        top_values, top_ids = host[2 * n : 2 * n + n * k], host[2 * n + n * k :]
        formatted = []
        for row, request in enumerate(staged.requests):
            asked = request.sampling_params.logprobs
            if asked is None:
                formatted.append(None)
                continue
            start = row * k
            formatted.append(TokenLogprobs(logprobs[row], [(int(i), v) for i, v in
                                                           zip(top_ids[start : start + asked],
                                                               top_values[start : start + asked])]))
        return token_ids, formatted
