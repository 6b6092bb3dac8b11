"""Messages between the API process and the engine process (torch-free: the API imports them)."""

import time
from dataclasses import dataclass, field

from llamaserve.sampling_params import SamplingParams


# Upper bounds of the tokens-per-engine-step histogram: one decode of a 135M model on a CPU up to
# 16k-token prefill steps of a 70B model on GPUs. The engine counts steps per bucket (see EngineStats).
ITERATION_TOKENS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def kv_blocks_needed(max_num_tokens: int, block_size: int) -> int:
    """KV blocks a request of at most `max_num_tokens` (prompt + output) can occupy: its last sampled
    token never enters the cache. The engine refuses requests that need more than the cache holds,
    and the API checks the same rule before a stream starts."""
    return -(-(max_num_tokens - 1) // block_size)


@dataclass
class TokenLogprobs:
    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    lora: str | None = None  # the adapter's name; None: the base model


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class LoadAdapter:
    """Register a LoRA adapter folder under `name`; answered by a CommandResult."""

    command_id: int
    name: str
    path: str


@dataclass
class UnloadAdapter:
    command_id: int
    name: str


@dataclass
class CommandResult:
    command_id: int
    error: str | None = None  # None: done


@dataclass
class RequestOutput:
    """What one request gained in one step (all of a step's outputs travel in one message)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when asked for
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # why the request failed (finish_reason "error")
    # "invalid_request": the engine refused it; "engine_error": a fault while it ran
    error_type: str | None = None
    # time.monotonic() stamps (the same clock in every process of a host), for latency metrics.
    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_time: float | None = None  # when new_token_ids were sampled (one inter-token gap per token)
    finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """The engine's counters since start and its load now; travels with every step's outputs."""

    steps: int = 0
    computed_tokens: int = 0  # tokens the model ran (prefill chunks + decodes)
    generated_tokens: int = 0
    preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks held by requests
    # Model steps by tokens computed, one count per ITERATION_TOKENS_BUCKETS bound, then one for larger
    # steps: a histogram kept in the engine, so that steps which send no message are counted too.
    iteration_tokens_counts: list[int] = field(default_factory=lambda: [0] * (len(ITERATION_TOKENS_BUCKETS) + 1))


@dataclass
class StepOutputs:
    """One engine step's message: every request's news, and the engine's stats after the step."""

    outputs: list[RequestOutput]
    stats: EngineStats
