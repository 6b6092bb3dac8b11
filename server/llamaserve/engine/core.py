"""The engine loop: schedule -> execute -> update.

A request with structured output waits aside, outside the scheduler, while its grammar compiles on a
worker thread; the first step after the compile admits it (or refuses it, when the constraint cannot be
used), so a compile never holds up the batch.
"""

import ctypes
import logging
from bisect import bisect_left
from collections.abc import Callable
from concurrent import futures

from llamaserve.config import EngineConfig
from llamaserve.engine.block_manager import BlockManager
from llamaserve.engine.faults import describe, is_fatal
from llamaserve.engine.grammar import GrammarManager
from llamaserve.engine.messages import (
    ITERATION_TOKENS_BUCKETS,
    AddRequest,
    CommandResult,
    EngineStats,
    LoadAdapter,
    RequestOutput,
    UnloadAdapter,
)
from llamaserve.engine.model_runner import ModelRunner, RunnerOutput
from llamaserve.engine.request import Request, RequestStatus
from llamaserve.engine.scheduler import Scheduler


# glibc keeps freed memory for reuse; a trim when the engine falls idle gives it back, so the engine's RSS
# tracks what it holds. None where the C library has no malloc_trim (musl, macOS).
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, on_worker_death: Callable[[str], None] | None = None,
                 wake: Callable[[], None] | None = None):
        """`on_worker_death(reason)`: what to do when a tensor-parallel worker process exits unasked
        (default: every later step raises). `wake()`: called on a grammar thread when a compile finishes,
        so that an engine loop blocked waiting for messages steps again (see `has_work`)."""
        self.config = config
        self.runner = ModelRunner(config, on_worker_death=on_worker_death)
        arch = self.runner.arch
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager, arch.eos_token_ids,
                                   config.lora.max_loras if config.lora.enabled else 0)
        self.stats = EngineStats()
        self.grammars = GrammarManager(self.runner.checkpoint, arch.vocab_size, arch.eos_token_ids)
        self._wake = wake
        # Constrained requests whose grammar is compiling, in arrival order: id -> (request, compile Future).
        self._compiling: dict[str, tuple[Request, futures.Future]] = {}
        self._notices: list[RequestOutput] = []  # for the next step: requests aborted while compiling

    def add_request(self, add: AddRequest) -> RequestOutput | None:
        """Queues the request; returns an error output instead when it can never run."""
        vocab = self.runner.arch.vocab_size
        try:
            request = Request(add.request_id, add.prompt_token_ids, add.sampling_params, add.priority,
                              add.arrival_time, add.lora)
            if add.lora is not None and not self.runner.has_adapter(add.lora):
                raise ValueError(f"no LoRA adapter named {add.lora!r} is loaded")
            if any(not 0 <= t < vocab for t in add.prompt_token_ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")
            if any(not 0 <= t < vocab for t in add.sampling_params.logit_bias):
                raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
            if add.request_id in self._compiling:
                raise ValueError(f"request id {add.request_id!r} is already in use")
            structured = add.sampling_params.structured
            if structured is None:
                self.scheduler.add_request(request)
            else:
                self.scheduler.check_request(request)  # what can be refused at once is refused at once
                self._await_grammar(request, self.grammars.compile(structured))
        except ValueError as e:
            return self._refusal(add.request_id, str(e))
        except Exception as e:  # whatever else a malformed request trips over: it alone is refused
            log.exception("refused request %s", add.request_id)
            return self._refusal(add.request_id, describe(e))
        return None

    @staticmethod
    def _refusal(request_id: str, error: str) -> RequestOutput:
        return RequestOutput(request_id, [], finish_reason="error", error=error, error_type="invalid_request")

    def _await_grammar(self, request: Request, grammar: futures.Future) -> None:
        """The request waits aside until its grammar is compiled; the compile's end wakes the engine loop."""
        self._compiling[request.request_id] = (request, grammar)
        if self._wake is not None:
            grammar.add_done_callback(lambda _: self._wake())  # at once when already compiled (a cache hit)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Requests whose compile has finished join the scheduler, each with its own matcher (keeping their
        arrival time, so they queue where they arrived), and get an empty output: the API waits for it
        before it opens a stream, so that a constraint that cannot be used is still an HTTP 400. A failed
        compile refuses its request. Returns these outputs and any notices due."""
        notices, self._notices = self._notices, []
        for request_id, (request, grammar) in list(self._compiling.items()):  # a handful at most
            if not grammar.done():
                continue
            del self._compiling[request_id]
            try:
                request.matcher = self.grammars.matcher(grammar.result())
                self.scheduler.add_request(request)
            except Exception as e:  # GrammarError (a ValueError) says what is wrong with the constraint
                if not isinstance(e, ValueError):
                    log.exception("refused request %s", request_id)
                request.matcher = None
                notices.append(self._refusal(request_id, str(e) if isinstance(e, ValueError) else describe(e)))
                continue
            notices.append(RequestOutput(request_id, [], num_prompt_tokens=request.num_prompt_tokens,
                                         arrival_time=request.arrival_time))
        return notices

    @property
    def num_compiling(self) -> int:
        """Requests waiting for their grammar to compile."""
        return len(self._compiling)

    def wait_for_grammars(self, timeout: float | None = None) -> bool:
        """Blocks until every pending compile has finished; False if `timeout` seconds pass first. For
        callers that drive `step` themselves (tests, LLM); the engine loop is woken by `wake` instead."""
        _, pending = futures.wait([grammar for _, grammar in self._compiling.values()], timeout)
        return not pending

    def run_command(self, command: LoadAdapter | UnloadAdapter) -> CommandResult:
        """Adapter registration, between steps."""
        try:
            if isinstance(command, LoadAdapter):
                self.runner.register_adapter(command.name, command.path)
            else:
                self.runner.unregister_adapter(command.name)
        except (ValueError, OSError) as e:  # AdapterError is a ValueError; a missing folder an OSError
            return CommandResult(command.command_id, str(e))
        except Exception as e:  # whatever else a malformed folder trips over: this command alone fails
            return CommandResult(command.command_id, describe(e))
        return CommandResult(command.command_id)

    def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            entry = self._compiling.pop(request_id, None)
            if entry is not None:  # it holds nothing yet; its compile runs on and stays cached
                entry[0].finish(RequestStatus.FINISHED_ABORTED)
                self._notices.append(self._output(entry[0], None))
        self.scheduler.abort_requests(request_ids)

    def shutdown(self) -> None:
        """Stop the grammar threads' queued compiles and the tensor-parallel workers, if any."""
        self.grammars.shutdown()
        self.runner.shutdown()

    def has_work(self) -> bool:
        """Whether `step` has anything to do now. A request whose grammar is still compiling does not count:
        the engine loop waits for messages meanwhile, and `wake` ends the wait when the compile finishes."""
        return (self.scheduler.has_unfinished_requests() or bool(self._notices)
                or any(grammar.done() for _, grammar in self._compiling.values()))

    def step(self) -> list[RequestOutput]:
        """One engine step. Faults end only the requests they concern (see llamaserve.engine.faults)."""
        notices = self._admit_compiled()
        try:
            step = self.scheduler.schedule()
            result = self._execute(step)
            failed = self.scheduler.fail_requests(result.errors)
            updated = self.scheduler.update(step, result.token_ids, result.completed)
        except Exception as e:  # the scheduler's own state: start again from an empty batch
            if is_fatal(e):
                raise
            return notices + self._reset(e)
        self._count(step, result)
        outputs = [self._output(r, result) for r in updated]
        outputs += [self._output(r, None) for r in step.finished + failed]
        self._release([*updated, *step.finished, *failed])
        return notices + outputs

    def _execute(self, step) -> RunnerOutput:
        """The runner's step; a fault in it that is not fatal fails every request of the step."""
        if not step.scheduled:
            return RunnerOutput({}, {})
        try:
            return self.runner.execute(step)
        except Exception as e:
            if is_fatal(e):
                raise
            log.exception("an engine step of %d requests failed; they fail, the engine serves on", len(step.scheduled))
            self.runner.recover()
            error = f"the engine step running this request failed: {describe(e)}"
            return RunnerOutput({}, {}, {item.request.request_id: error for item in step.scheduled})

    def _reset(self, error: Exception) -> list[RequestOutput]:
        log.exception("the scheduler failed; every request fails and the engine serves on", exc_info=error)
        failed = self.scheduler.fail_all(f"the engine's scheduler failed: {describe(error)}")
        self.block_manager.check_integrity()  # every block is free again, or nothing can be trusted: fatal
        self._release(failed)
        return [self._output(r, None) for r in failed]

    def _release(self, requests: list[Request]) -> None:
        for r in requests:
            if r.status.finished:
                self.runner.release(r.request_id)
                r.matcher = None
        if not self.has_work():
            self.block_manager.check_integrity()  # cheap when idle; a leak shows up at once
            if _malloc_trim is not None:
                _malloc_trim(0)

    def _count(self, step, result: RunnerOutput) -> None:
        s = self.stats
        s.steps += 1
        s.computed_tokens += step.num_batched_tokens
        if step.num_batched_tokens:  # a step that only reports aborts ran no model
            # A fresh list: the shallow copy sent with this step's outputs must not change afterwards.
            counts = list(s.iteration_tokens_counts)
            counts[bisect_left(ITERATION_TOKENS_BUCKETS, step.num_batched_tokens)] += 1
            s.iteration_tokens_counts = counts
        s.generated_tokens += len(result.token_ids)
        s.preemptions += len(step.preempted_ids)
        s.prefix_queried_tokens = self.block_manager.prefix_queries_tokens
        s.prefix_hit_tokens = self.block_manager.prefix_hits_tokens
        s.num_running = self.scheduler.num_running
        s.num_waiting = self.scheduler.num_waiting + len(self._compiling)
        s.kv_cache_usage = self.block_manager.usage

    @staticmethod
    def _output(request: Request, result: RunnerOutput | None) -> RequestOutput:
        sampled = result is not None and request.request_id in result.token_ids
        logprobs = result.logprobs.get(request.request_id) if sampled else None
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[request.output_token_ids[-1]] if sampled else [],
            finish_reason=request.status.finish_reason,
            error=request.error,
            error_type="engine_error" if request.error is not None else None,
            logprobs=[logprobs] if logprobs is not None else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_prompt_tokens,
            arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time,
            first_token_time=request.first_token_time,
            token_time=request.token_times[-1] if sampled else None,
            finished_time=request.finished_time,
        )
