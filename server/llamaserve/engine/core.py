"""The engine loop: schedule -> execute -> update, and the messages it exchanges with clients."""

import logging
import time
from dataclasses import dataclass, field

from llamaserve.config import EngineConfig
from llamaserve.engine.block_manager import BlockManager
from llamaserve.engine.model_runner import ModelRunner, RunnerOutput, TokenLogprobs
from llamaserve.engine.request import Request
from llamaserve.engine.scheduler import Scheduler
from llamaserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class RequestOutput:
    """What one request gained in one step (all of a step's outputs travel in one message)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when asked for
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # why the engine refused the request (finish_reason "error")
    # time.monotonic() stamps (the same clock in every process of a host), for latency metrics.
    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """Counters since start; cheap to copy."""

    steps: int = 0
    computed_tokens: int = 0  # tokens the model ran (prefill chunks + decodes)
    generated_tokens: int = 0
    preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.runner = ModelRunner(config)
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.runner.arch.eos_token_ids)
        self.stats = EngineStats()

    def add_request(self, add: AddRequest) -> RequestOutput | None:
        """Queues the request; returns an error output instead when it can never run."""
        request = Request(add.request_id, add.prompt_token_ids, add.sampling_params, add.priority, add.arrival_time)
        vocab = self.runner.arch.vocab_size
        try:
            if any(not 0 <= t < vocab for t in add.prompt_token_ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")
            if any(not 0 <= t < vocab for t in add.sampling_params.logit_bias):
                raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
            self.scheduler.add_request(request)
        except ValueError as e:
            return RequestOutput(add.request_id, [], finish_reason="error", error=str(e))
        return None

    def abort(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        step = self.scheduler.schedule()
        result = self.runner.execute(step) if step.scheduled else RunnerOutput({}, {})
        updated = self.scheduler.update(step, result.token_ids)
        self._count(step, result)
        outputs = [self._output(r, result) for r in updated]
        outputs += [self._output(r, None) for r in step.finished]
        for r in updated + step.finished:
            if r.status.finished:
                self.runner.release(r.request_id)
        if not self.has_work():
            self.block_manager.check_integrity()  # cheap when idle; a leak shows up at once
        return outputs

    def _count(self, step, result: RunnerOutput) -> None:
        s = self.stats
        s.steps += 1
        s.computed_tokens += step.num_batched_tokens
        s.generated_tokens += len(result.token_ids)
        s.preemptions += len(step.preempted_ids)
        s.prefix_queried_tokens = self.block_manager.prefix_queries_tokens
        s.prefix_hit_tokens = self.block_manager.prefix_hits_tokens

    @staticmethod
    def _output(request: Request, result: RunnerOutput | None) -> RequestOutput:
        sampled = result is not None and request.request_id in result.token_ids
        logprobs = result.logprobs.get(request.request_id) if sampled else None
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[request.output_token_ids[-1]] if sampled else [],
            finish_reason=request.status.finish_reason,
            logprobs=[logprobs] if logprobs is not None else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_prompt_tokens,
            arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time,
            first_token_time=request.first_token_time,
            finished_time=request.finished_time,
        )
