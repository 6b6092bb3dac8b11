"""One generation request as the engine sees it: token ids, progress through them, and timestamps."""

import enum
import time
from dataclasses import dataclass, field

from llamaserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # queued for admission (new, or preempted and waiting to recompute)
    RUNNING = enum.auto()  # holds KV blocks and is scheduled every step the budget allows
    FINISHED_STOPPED = enum.auto()  # sampled a stop token or EOS
    FINISHED_LENGTH = enum.auto()  # reached max_tokens or max_model_len
    FINISHED_ABORTED = enum.auto()  # the client went away
    FINISHED_ERROR = enum.auto()  # a fault while running it: the engine failed it and serves on

    @property
    def finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """"stop", "length", "abort" or "error"; None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(slots=True, eq=False)
class Request:
    """Mutable state of one request; owned by the scheduler. Times are time.monotonic() seconds."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0  # "priority" policy: lower values are admitted first and preempted last
    arrival_time: float = field(default_factory=time.monotonic)
    lora: str | None = None  # the LoRA adapter it runs with; None: the base model

    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    # Leading tokens of all_token_ids whose KV is in the cache; the next step computes from here.
    num_computed_tokens: int = field(default=0, init=False)
    # Prompt tokens served from the prefix cache at the latest admission.
    num_cached_prompt_tokens: int = field(default=0, init=False)
    num_preemptions: int = field(default=0, init=False)
    output_token_ids: list[int] = field(default_factory=list, init=False)
    # Prompt + output in one growing list, so reading it every step costs nothing.
    all_token_ids: list[int] = field(init=False)

    first_scheduled_time: float | None = field(default=None, init=False)
    token_times: list[float] = field(default_factory=list, init=False)  # one per output token
    finished_time: float | None = field(default=None, init=False)
    error: str | None = field(default=None, init=False)  # why it failed (FINISHED_ERROR)
    # Structured output: the xgrammar GrammarMatcher that has accepted every output token so far (it
    # survives preemption as it is); None: free text. Set once the request's grammar is compiled.
    matcher: object | None = field(default=None, init=False)

    def __post_init__(self):
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def first_token_time(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    def append_output_token(self, token_id: int, now: float | None = None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self.token_times.append(time.monotonic() if now is None else now)

    def preempt(self) -> None:
        """Forgets all computed KV: the request waits again and later re-prefills prompt + output so far."""
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_preemptions += 1

    def finish(self, status: RequestStatus, now: float | None = None) -> None:
        assert status.finished, status
        self.status = status
        self.finished_time = time.monotonic() if now is None else now
