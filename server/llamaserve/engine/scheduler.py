"""Continuous batching with one primitive: a token budget per request per step.

Each step gives every scheduled request a count of new tokens to compute, starting at its
num_computed_tokens. A decode is a count of 1, a prefill chunk a larger count, and a prefix
cache hit simply moves num_computed_tokens forward before the first count is chosen.
"""

import heapq
import itertools
import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from llamaserve.config import SchedulerConfig
from llamaserve.engine.block_manager import BlockManager
from llamaserve.engine.messages import kv_blocks_needed
from llamaserve.engine.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int  # compute request.all_token_ids[start : start + num_new_tokens] at positions start..
    block_table: list[int]  # the block manager's live table: read it during this step only
    sample: bool  # this chunk ends at the last known token, so the model samples the next one


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    preempted_ids: list[str]
    finished: list[Request]  # finished outside sampling (aborted) since the last step, to report


class WaitingQueue:
    """Requests waiting for admission, ordered by (priority, arrival) or by arrival alone.

    A preempted request keeps its key, so it returns ahead of everything that arrived after it.
    Aborted requests are dropped lazily when they reach the head (no O(n) removal).
    """

    def __init__(self, by_priority: bool):
        self._by_priority = by_priority
        self._heap: list[tuple[int, float, int, Request]] = []
        self._tiebreak = itertools.count()

    def push(self, request: Request) -> None:
        priority = request.priority if self._by_priority else 0
        heapq.heappush(self._heap, (priority, request.arrival_time, next(self._tiebreak), request))

    def peek(self) -> Request | None:
        while self._heap and self._heap[0][-1].status is not RequestStatus.WAITING:
            heapq.heappop(self._heap)
        return self._heap[0][-1] if self._heap else None

    def pop(self) -> Request:
        request = self.peek()
        assert request is not None, "pop from an empty waiting queue"
        heapq.heappop(self._heap)
        return request


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, eos_token_ids: Iterable[int],
                 max_loras: int = 0):
        """`max_loras`: the most distinct LoRA adapters the running batch may use at once."""
        if config.max_num_batched_tokens < config.max_num_seqs:
            # Otherwise the newest running requests could wait forever for a decode slot.
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._running: dict[str, Request] = {}  # in admission order: the last is the newest
        self._waiting = WaitingQueue(by_priority=config.policy == "priority")
        self._unreported: list[Request] = []  # aborted since the last schedule()
        self.max_loras = max_loras
        self._running_loras: Counter[str] = Counter()  # adapter -> running requests using it

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._requests) - len(self._running)

    def has_unfinished_requests(self) -> bool:
        """True while a request is waiting or running, or an abort has yet to be reported by schedule()."""
        return bool(self._requests or self._unreported)

    def max_num_tokens(self, request: Request) -> int:
        """The most tokens (prompt + output) the request can ever hold."""
        limit = self.config.max_model_len
        max_tokens = request.sampling_params.max_tokens
        return limit if max_tokens is None else min(request.num_prompt_tokens + max_tokens, limit)

    def add_request(self, request: Request) -> None:
        """Queues a request; ValueError when it could never run to completion."""
        self.check_request(request)
        self._requests[request.request_id] = request
        self._waiting.push(request)

    def check_request(self, request: Request) -> None:
        """ValueError when the request could never run to completion (before it waits for its grammar)."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if not 0 < request.num_prompt_tokens < self.config.max_model_len:
            raise ValueError(
                f"prompt has {request.num_prompt_tokens} tokens; it must have 1 to "
                f"{self.config.max_model_len - 1} (max_model_len {self.config.max_model_len})"
            )
        # A request that outgrows the whole cache would preempt itself forever, so refuse it now.
        blocks = kv_blocks_needed(self.max_num_tokens(request), self.block_manager.block_size)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"request may need {blocks} KV blocks but the cache holds {self.block_manager.num_blocks}; "
                "lower max_tokens or the prompt length"
            )

    def abort_requests(self, request_ids: str | Iterable[str]) -> None:
        """Finishes waiting or running requests as aborted and frees their blocks now.

        They are reported in the next SchedulerOutput.finished; unknown or finished ids are ignored.
        """
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self._requests.get(request_id)
            if request is not None:
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                self._unreported.append(request)

    def fail_requests(self, errors: Mapping[str, str]) -> list[Request]:
        """Finishes the named requests with an error (request id -> why) and frees their blocks now;
        returns them for the caller to report. Unknown or finished ids are ignored."""
        failed = []
        for request_id, error in errors.items():
            request = self._requests.get(request_id)
            if request is not None:
                request.error = error
                self._finish(request, RequestStatus.FINISHED_ERROR)
                failed.append(request)
        return failed

    def fail_all(self, error: str) -> list[Request]:
        """After a fault in the scheduler's own bookkeeping: every unfinished request fails (aborted ones
        still to report come along), leaving nothing that the fault may have left half-done."""
        finished, self._unreported = self._unreported, []
        return finished + self.fail_requests(dict.fromkeys(self._requests, error))

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        preempted_ids: list[str] = []

        # Running requests first, oldest first. A request is admitted only when the budget outlasts
        # the previous admission's prefill, so only the newest can be mid-prefill: its chunk comes
        # after every decode and cannot starve them.
        for request in list(self._running.values()):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.block_manager.allocate(request, num_new_tokens):
                victim = self._preemption_victim()
                self._preempt(victim)
                preempted_ids.append(victim.request_id)
                if victim.request_id in scheduled:  # the priority policy may pick one already scheduled
                    budget += scheduled.pop(victim.request_id).num_new_tokens
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                scheduled[request.request_id] = self._chunk(request, num_new_tokens)
                budget -= num_new_tokens

        # Admit waiting requests while the step has room; a preemption means blocks are short.
        while not preempted_ids and budget > 0 and len(self._running) < self.config.max_num_seqs:
            request = self._waiting.peek()
            if request is None:
                break
            if request.lora is not None and request.lora not in self._running_loras \
                    and len(self._running_loras) >= self.max_loras:
                break  # every adapter slot is taken by running requests: wait for one to free
            num_cached = self.block_manager.match_prefix(request)
            num_new_tokens = min(request.num_tokens - num_cached, budget)  # long prompts are chunked
            if not self.block_manager.allocate(request, num_new_tokens):  # sets num_computed_tokens
                break  # the head of the queue waits for blocks; nobody overtakes it
            self._waiting.pop()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self._running[request.request_id] = request
            if request.lora is not None:
                self._running_loras[request.lora] += 1
            scheduled[request.request_id] = self._chunk(request, num_new_tokens)
            budget -= num_new_tokens

        finished, self._unreported = self._unreported, []
        return SchedulerOutput(
            scheduled=list(scheduled.values()),
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            preempted_ids=preempted_ids,
            finished=finished,
        )

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[str, int],
               completed: Collection[str] = ()) -> list[Request]:
        """Applies a computed step. sampled_token_ids maps the id of every scheduled request with
        sample=True to its new token; `completed` names the requests whose grammar that token ended
        (they stop). Returns the requests that got a token (finished ones included).
        """
        now = time.monotonic()
        updated = []
        for item in output.scheduled:
            request = item.request
            if self._running.get(request.request_id) is not request:  # aborted while the step ran
                continue
            request.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(request)
            if not item.sample:
                continue
            token_id = sampled_token_ids[request.request_id]
            request.append_output_token(token_id, now)
            status = self._stop_status(request, token_id)
            if request.request_id in completed:  # the grammar allows nothing more (normally: on EOS anyway)
                status = RequestStatus.FINISHED_STOPPED
            if status is not None:
                self._finish(request, status, now)
            updated.append(request)
        return updated

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if token_id in params.stop_token_ids or (token_id in self.eos_token_ids and not params.ignore_eos):
            return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _chunk(self, request: Request, num_new_tokens: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(
            request=request,
            num_new_tokens=num_new_tokens,
            start=start,
            block_table=self.block_manager.block_table(request.request_id),
            sample=start + num_new_tokens == request.num_tokens,
        )

    def _preemption_victim(self) -> Request:
        """The newest running request; under "priority", the newest of the lowest priority."""
        newest_first = reversed(self._running.values())
        if self.config.policy == "priority":
            # A scan, but preemption only happens when blocks run out.
            return max(newest_first, key=lambda r: r.priority)
        return next(newest_first)

    def _leave_running(self, request: Request) -> None:
        if self._running.pop(request.request_id, None) is not None and request.lora is not None:
            self._running_loras[request.lora] -= 1
            if not self._running_loras[request.lora]:
                del self._running_loras[request.lora]

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        self._leave_running(request)
        request.preempt()
        self._waiting.push(request)

    def _finish(self, request: Request, status: RequestStatus, now: float | None = None) -> None:
        self.block_manager.free(request)
        self._leave_running(request)
        del self._requests[request.request_id]
        request.finish(status, now)
