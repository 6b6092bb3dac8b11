"""Chat and completions: requests turned into engine requests, engine outputs into OpenAI responses.

Each choice is one engine request. Its token ids are detokenized incrementally and cut at stop
strings here, in the API process, into `ChoiceDelta`s; the streaming and the non-streaming paths
format the same deltas, so they cannot disagree on the text.
"""

import asyncio
import hashlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from importlib.metadata import version
from typing import TypeVar

from fastapi import Request, Response
from pydantic import BaseModel

from llamaserve.api.errors import (
    APIError,
    bad_request,
    engine_dead,
    engine_request_error,
    engine_stalled,
    overloaded,
)
from llamaserve.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    FunctionCall,
    INT64_MAX,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    ToolCall,
    TopLogprob,
    UnloadLoraAdapterRequest,
    Usage,
)
from llamaserve.api.streaming import event_stream, merge, sse_event
from llamaserve.api.structured import structured_output
from llamaserve.api.telemetry import GenerationRecord, Telemetry
from llamaserve.api.tools import ToolCallDelta, ToolCallParser, ToolCalling, chat_inputs, tool_calling
from llamaserve.config import ServerConfig
from llamaserve.engine.client import AsyncEngineClient
from llamaserve.engine.messages import TokenLogprobs, kv_blocks_needed
from llamaserve.sampling_params import SamplingParams, StructuredOutput
from llamaserve.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

# Stable for one build of the server: clients may compare it to notice a server change.
SYSTEM_FINGERPRINT = "fp_" + hashlib.sha256(f"llamaserve {version('llamaserve')}".encode()).hexdigest()[:10]
MIN_LOGPROB = -9999.0  # JSON has no -inf
TIMEOUT_HEADER = "x-request-timeout"  # seconds: a client's own deadline, at most the server's

T = TypeVar("T")


@dataclass
class ChoiceRequest:
    """One choice of a response, and the engine request behind it."""

    index: int  # the choice's index in the response
    prompt_index: int  # which prompt of a batched completions request
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class ChoiceDelta:
    """What one engine step added to one choice."""

    index: int
    prompt_index: int
    text: str  # releasable text: stop strings and their held-back beginnings excluded
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    text_offset: int  # where these tokens' text starts in the choice's decoded text
    finish_reason: str | None  # "stop" | "length" on a choice's last delta
    num_cached_tokens: int


class UsageCounter:
    """Prompt tokens count once per prompt, however many choices share it (as OpenAI bills them)."""

    def __init__(self, choices: Sequence[ChoiceRequest]):
        self._prompt_tokens = {c.prompt_index: len(c.prompt_ids) for c in choices}
        self._cached_tokens = dict.fromkeys(self._prompt_tokens, 0)
        self._completion_tokens = 0

    def add(self, delta: ChoiceDelta) -> None:
        self._completion_tokens += len(delta.token_ids)
        self._cached_tokens[delta.prompt_index] = max(self._cached_tokens[delta.prompt_index], delta.num_cached_tokens)

    def usage(self) -> Usage:
        prompt_tokens = sum(self._prompt_tokens.values())
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=self._completion_tokens,
            total_tokens=prompt_tokens + self._completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self._cached_tokens.values())),
        )


class Slots:
    """Admission: generations admitted and not yet finished, at most `limit`. A request reserves its
    choices' slots when it is admitted, before any of them starts, so a burst cannot overshoot."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0

    def reserve(self, n: int) -> Callable[[], None]:
        """Takes n slots, or refuses with 429 and Retry-After; returns the (idempotent) release."""
        if n > self.limit:  # could never run: retrying would not help
            raise bad_request(f"{n} choices exceed the server's limit of {self.limit} concurrent generations", "n")
        if self.in_use + n > self.limit:
            raise overloaded(self.limit)
        self.in_use += n
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_use -= n

        return release


class OpenAIServing:
    def __init__(self, client: AsyncEngineClient, tokenizer: Tokenizer, model_name: str, telemetry: Telemetry,
                 config: ServerConfig):
        self.client = client
        self.config = config
        self.slots = Slots(config.max_concurrent_requests)
        self.request_timeout = config.request_timeout  # seconds; None: only the client's header sets a deadline
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="llamaserve-tokenizer")
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.telemetry = telemetry
        self.max_model_len = client.ready.max_model_len
        self.created = int(time.time())
        self.adapters = dict(client.ready.adapters)  # LoRA adapters served by name: name -> folder

    # ---- endpoints --------------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest, raw: Request) -> Response:
        response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        record = self.telemetry.start(raw, "chat", request, response_id)
        lora = self._check_serving(request.model)
        self._check_limits(request, 1)
        if request.top_logprobs is not None and not request.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        structured = structured_output(request)
        calling = tool_calling(request, self.tokenizer.chat_template)  # None: answers are text only
        if calling is not None:
            structured = calling.structured_output(structured)
        prompt_ids = await self._off_loop(self._chat_prompt, request.messages, True,
                                          calling.tools if calling is not None else None)
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        choices = self._choices(request, [prompt_ids], logprobs, "messages", structured)
        generation = self._admit(raw, response_id, choices, request.priority, lora, record)
        # Each choice's text split into content and tool calls as it streams.
        parsers = {c.index: calling.parser() for c in choices} if calling is not None else None

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            return sse_event(ChatCompletionChunk(id=response_id, created=created, model=lora or self.model_name,
                                                 system_fingerprint=SYSTEM_FINGERPRINT, choices=choices, usage=usage))

        async def events() -> AsyncIterator[str]:
            for c in choices:  # the role comes first, before any text
                yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))])
            usage = UsageCounter(choices)
            async for d in generation.deltas():
                usage.add(d)
                if parsers is not None:
                    for choice in self._tool_chunk_choices(parsers[d.index], d, logprobs is not None):
                        yield chunk([choice])
                elif d.text or d.logprobs or d.finish_reason:
                    lp = self._chat_logprobs([d]) if logprobs is not None else None
                    choice = ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text or None), logprobs=lp,
                                             finish_reason=d.finish_reason)
                    yield chunk([choice])
            if request.include_usage:
                yield chunk([], usage.usage())

        if request.stream:
            return await generation.stream(raw, events())
        deltas, usage = await generation.collect(raw)
        answers = []
        for i, ds in deltas.items():
            message, finish_reason = self._chat_message("".join(d.text for d in ds), ds[-1].finish_reason, calling)
            answers.append(ChatChoice(index=i, message=message, finish_reason=finish_reason,
                                      logprobs=self._chat_logprobs(ds) if logprobs is not None else None))
        return json_response(ChatCompletion(
            id=response_id, created=created, model=lora or self.model_name, system_fingerprint=SYSTEM_FINGERPRINT,
            choices=answers, usage=usage,
        ))

    async def completions(self, request: CompletionRequest, raw: Request) -> Response:
        response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        record = self.telemetry.start(raw, "text_completion", request, response_id)
        lora = self._check_serving(request.model)
        # A string or a list of token ids is one prompt; a list of either is one prompt per entry.
        single = isinstance(request.prompt, str) or bool(request.prompt) and isinstance(request.prompt[0], int)
        self._check_limits(request, 1 if single else len(request.prompt))
        structured = structured_output(request)
        prompts = await self._off_loop(self._completion_prompts, request.prompt)
        choices = self._choices(request, prompts, request.logprobs, "prompt", structured)
        generation = self._admit(raw, response_id, choices, request.priority, lora, record)

        def completion(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
            return Completion(id=response_id, created=created, model=lora or self.model_name,
                              system_fingerprint=SYSTEM_FINGERPRINT, choices=choices, usage=usage)

        def logprobs(deltas: list[ChoiceDelta]) -> CompletionLogprobs | None:
            return self._completion_logprobs(deltas) if request.logprobs is not None else None

        async def events() -> AsyncIterator[str]:
            usage = UsageCounter(choices)
            async for d in generation.deltas():
                usage.add(d)
                if d.text or d.logprobs or d.finish_reason:
                    choice = CompletionChoice(index=d.index, text=d.text, logprobs=logprobs([d]),
                                              finish_reason=d.finish_reason)
                    yield sse_event(completion([choice]))
            if request.include_usage:
                yield sse_event(completion([], usage.usage()))

        if request.stream:
            return await generation.stream(raw, events())
        deltas, usage = await generation.collect(raw)
        return json_response(completion(
            [CompletionChoice(index=i, text="".join(d.text for d in ds), logprobs=logprobs(ds),
                              finish_reason=ds[-1].finish_reason) for i, ds in deltas.items()],
            usage,
        ))

    def models(self) -> ModelList:
        """The base model, then each LoRA adapter with the base as its parent."""
        base = ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_model_len)
        return ModelList(data=[base, *(ModelCard(id=name, created=self.created, max_model_len=self.max_model_len,
                                                 root=path, parent=self.model_name)
                                       for name, path in self.adapters.items())])

    async def load_adapter(self, request: LoadLoraAdapterRequest) -> str:
        if not self.client.ready.lora_enabled:
            raise bad_request("LoRA adapters are off: start the server with --enable-lora or --lora-modules",
                              "lora_name")
        if request.lora_name == self.model_name or request.lora_name in self.adapters:
            raise bad_request(f"the name {request.lora_name!r} is already served", "lora_name")
        try:
            await self.client.load_adapter(request.lora_name, request.lora_path)
        except ValueError as e:  # the engine's reason: a missing folder, an unsupported or mismatched adapter
            raise bad_request(str(e), "lora_path") from None
        self.adapters[request.lora_name] = request.lora_path
        return f"Success: LoRA adapter '{request.lora_name}' added successfully."

    async def unload_adapter(self, request: UnloadLoraAdapterRequest) -> str:
        if self.adapters.pop(request.lora_name, None) is None:
            raise APIError(404, f"no LoRA adapter named {request.lora_name!r} is loaded", "lora_name", "not_found")
        await self.client.unload_adapter(request.lora_name)
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self._check_serving(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("give either 'prompt' or 'messages'", "prompt")
        if request.messages is not None:
            self._check_count(len(request.messages), "max_messages", "messages", "messages")
            ids = await self._off_loop(self._chat_prompt, request.messages, request.add_generation_prompt)
        else:
            ids = await self._off_loop(self.tokenizer.encode, request.prompt, request.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.max_model_len)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check_serving(request.model)
        self._check_token_ids(request.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(request.tokens, skip_special_tokens=False))

    # ---- requests -> engine requests --------------------------------------------------------

    async def _off_loop(self, work: Callable[..., T], *args) -> T:
        """Runs tokenizer work (templates, encoding) on the tokenizer's own thread: a burst of long prompts
        would otherwise hold the event loop for a few milliseconds each, back to back. One thread, because
        the tokenizer releases the GIL while it encodes and more threads would only contend for it."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, work, *args)

    def _check_serving(self, model: str | None) -> str | None:
        """The engine is alive and `model` (if given) is served; returns its LoRA adapter, None for the base."""
        if not self.client.is_alive:  # before a stream starts, so a dead engine is a 503, not an error event
            raise engine_dead()
        if self.client.is_stalled:
            raise engine_stalled()
        if model is None or model == self.model_name:
            return None
        if model in self.adapters:
            return model
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'"
                       + (f" and the adapters {', '.join(map(repr, self.adapters))}" if self.adapters else ""),
                       "model", "model_not_found")

    def _admit(self, raw: Request, response_id: str, choices: list[ChoiceRequest], priority: int, lora: str | None,
               record: GenerationRecord) -> "Generation":
        """Reserves the choices' concurrency slots (or refuses with 429) and fixes the deadline."""
        deadline = self._deadline(raw)
        release = self.slots.reserve(len(choices))
        record.track([(c.prompt_index, c.prompt_ids) for c in choices])
        return Generation(self, response_id, choices, priority, lora, deadline, record, release)

    def _deadline(self, raw: Request) -> float | None:
        """When this request must be done (time.monotonic()): the server's --request-timeout, or the
        client's x-request-timeout header when that is shorter; None: no deadline."""
        timeouts = [self.request_timeout] if self.request_timeout is not None else []
        header = raw.headers.get(TIMEOUT_HEADER)
        if header is not None:
            try:
                timeout = float(header)
            except ValueError:
                timeout = float("nan")
            if not 0 < timeout < float("inf"):
                raise bad_request(f"{TIMEOUT_HEADER} must be a positive number of seconds", TIMEOUT_HEADER)
            timeouts.append(timeout)
        return raw.state.start_time + min(timeouts) if timeouts else None

    def _check_limits(self, request: SamplingRequest, num_prompts: int) -> None:
        """The request stays within the server's limits, checked before any tokenizing."""
        if isinstance(request, ChatCompletionRequest):
            self._check_count(len(request.messages), "max_messages", "messages", "messages")
        self._check_count(num_prompts, "max_prompts_per_request", "prompts", "prompt")
        self._check_count(request.n, "max_n", "choices", "n")
        if request.seed is not None and request.seed + request.n - 1 > INT64_MAX:
            raise bad_request(f"the choices' seeds (seed + 0 .. seed + {request.n - 1}) must fit in 64 bits: "
                              f"seed must be at most {INT64_MAX - request.n + 1} with n {request.n}", "seed")
        stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
        self._check_count(len(stop), "max_stop_strings", "stop strings", "stop")
        self._check_count(max(map(len, stop), default=0), "max_stop_string_length", "characters in a stop string",
                          "stop")
        self._check_count(len(request.logit_bias or ()), "max_logit_bias", "entries", "logit_bias")

    def _check_count(self, count: int, limit: str, what: str, param: str) -> None:
        """`count` of `what` in `param` is within the limit ServerConfig.`limit` (the flag of that name)."""
        if count > getattr(self.config, limit):
            raise bad_request(f"'{param}': {count} {what} exceed this server's limit of "
                              f"{getattr(self.config, limit)} (--{limit.replace('_', '-')})", param)

    def _chat_prompt(self, messages, add_generation_prompt: bool = True, tools=None) -> list[int]:
        """`tools`: the tools to show the model (api.tools renders them, and past tool calls, in the
        template's way or in the default one)."""
        try:
            conversation, template_tools = chat_inputs([m.model_dump(exclude_none=True) for m in messages], tools,
                                                       self.tokenizer.chat_template)
            return self.tokenizer.apply_chat_template(conversation, add_generation_prompt, template_tools)
        except ValueError as e:  # ChatTemplateError: roles out of order, unsupported content, ...
            raise bad_request(str(e), "messages") from None

    def _completion_prompts(self, prompt: str | list) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt)]
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if isinstance(prompt[0], str):
            return [self.tokenizer.encode(p) for p in prompt]
        return [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.client.ready.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise bad_request(f"token ids must be in [0, {vocab})", param)

    def _max_tokens(self, num_prompt_tokens: int, requested: int | None, prompt_param: str) -> int:
        """max_tokens checked against the context; when omitted, whatever room the context leaves."""
        limit, room = self.max_model_len, self.max_model_len - num_prompt_tokens
        if num_prompt_tokens == 0:
            raise bad_request("the prompt has no tokens", prompt_param)
        if requested is None and room < 1:
            raise bad_request(f"This model's maximum context length is {limit} tokens, and the prompt has "
                              f"{num_prompt_tokens}: no room is left for a completion", prompt_param,
                              "context_length_exceeded")
        max_tokens = room if requested is None else requested
        if max_tokens > room:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
                              f"{max_tokens} for the completion). Reduce the prompt or max_tokens.",
                              "max_tokens", "context_length_exceeded")
        # The engine refuses a request that could outgrow the whole KV cache; say so before streaming.
        ready = self.client.ready
        blocks = kv_blocks_needed(num_prompt_tokens + max_tokens, ready.block_size)
        if blocks > ready.num_kv_blocks:
            raise bad_request(f"the prompt ({num_prompt_tokens} tokens) with max_tokens {max_tokens} may need "
                              f"{blocks} KV cache blocks but the cache holds {ready.num_kv_blocks}; lower max_tokens",
                              "max_tokens", "context_length_exceeded")
        return max_tokens

    def _choices(self, request: SamplingRequest, prompts: list[list[int]], logprobs: int | None,
                 prompt_param: str, structured: StructuredOutput | None = None) -> list[ChoiceRequest]:
        stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
        logit_bias = self._logit_bias(request.logit_bias or {})
        stop_token_ids = frozenset(request.stop_token_ids or ())  # in the vocabulary: at most its size
        self._check_token_ids(list(stop_token_ids), "stop_token_ids")
        choices = []
        for p, prompt_ids in enumerate(prompts):
            self._check_token_ids(prompt_ids, prompt_param)
            max_tokens = self._max_tokens(len(prompt_ids), request.max_completion_tokens or request.max_tokens,
                                          prompt_param)
            for j in range(request.n):
                try:
                    params = SamplingParams(
                        temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                        min_p=request.min_p, repetition_penalty=request.repetition_penalty,
                        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                        logit_bias=logit_bias,
                        seed=None if request.seed is None else request.seed + j,  # choices differ, reproducibly
                        max_tokens=max_tokens, stop=tuple(stop), stop_token_ids=stop_token_ids,
                        ignore_eos=request.ignore_eos, logprobs=logprobs, structured=structured,
                    )
                except ValueError as e:  # its messages start with the field's name
                    raise bad_request(str(e), str(e).split()[0]) from None
                choices.append(ChoiceRequest(len(choices), p, prompt_ids, params))
        return choices

    def _logit_bias(self, bias: dict[str, float]) -> dict[int, float]:
        try:
            parsed = {int(token): value for token, value in bias.items()}
        except ValueError:
            raise bad_request("logit_bias keys must be token ids", "logit_bias") from None
        self._check_token_ids(list(parsed), "logit_bias")
        if any(not -100 <= v <= 100 for v in parsed.values()):
            raise bad_request("logit_bias values must be in [-100, 100]", "logit_bias")
        return parsed

    # ---- tool calls -------------------------------------------------------------------------

    def _chat_message(self, text: str, finish_reason: str, calling: ToolCalling | None
                      ) -> tuple[AssistantMessage, str]:
        """A whole answer, its tool calls parsed out of it, and its finish reason."""
        if calling is None:
            return AssistantMessage(content=text), finish_reason
        parser = calling.parser()
        parser.push(text)
        parser.flush()
        calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parser.calls]
        content = parser.content if parser.content or not calls else None  # as OpenAI: null beside calls
        return AssistantMessage(content=content, tool_calls=calls or None), parser.finish_reason(finish_reason)

    def _tool_chunk_choices(self, parser: ToolCallParser, delta: ChoiceDelta, logprobs: bool) -> list[ChatChunkChoice]:
        """One delta of a choice with tools, as stream chunks: content and call pieces in the order they were
        generated, each a chunk of its own; the tokens' logprobs ride on the first, the finish on the last."""
        pieces = parser.push(delta.text) + (parser.flush() if delta.finish_reason else [])
        messages = [DeltaMessage(content=p) if isinstance(p, str) else DeltaMessage(tool_calls=[_delta_tool_call(p)])
                    for p in pieces]
        if not messages and (delta.logprobs or delta.finish_reason):
            messages = [DeltaMessage()]
        lp = self._chat_logprobs([delta]) if logprobs else None
        finish_reason = parser.finish_reason(delta.finish_reason) if delta.finish_reason else None
        return [ChatChunkChoice(index=delta.index, delta=m, logprobs=lp if k == 0 else None,
                                finish_reason=finish_reason if k == len(messages) - 1 else None)
                for k, m in enumerate(messages)]

    # ---- engine outputs -> deltas -----------------------------------------------------------

    async def _run_choice(self, request_id: str, choice: ChoiceRequest,
                          generation: "Generation") -> AsyncIterator[ChoiceDelta]:
        params, record = choice.params, generation.record
        detokenizer = IncrementalDetokenizer(self.tokenizer, choice.prompt_ids, params.skip_special_tokens)
        matcher = StopStringMatcher(params.stop)
        decoded_len = 0  # characters decoded so far, held-back ones included (logprob text offsets)
        metrics = record.choices[choice.index]
        ended = None  # how the request ended; None when the consumer stopped early (a client gone): abort
        try:
            engine_outputs = self.client.generate(request_id, choice.prompt_ids, params, generation.priority,
                                                  generation.deadline, generation.lora)
            async with aclosing(engine_outputs) as outputs:
                async for out in outputs:  # leaving this loop early aborts the engine request
                    metrics.output(out)
                    if out.finish_reason == "error":
                        raise engine_request_error(out.error, out.error_type)
                    if out.finish_reason == "abort":
                        ended = "abort"
                        raise RuntimeError(f"the engine aborted request {request_id}")
                    # No flush at the end: a character cut by max_tokens is dropped rather than sent as U+FFFD.
                    decoded = detokenizer.push(out.new_token_ids)
                    text = matcher.push(decoded)
                    finish_reason = "stop" if matcher.stopped else out.finish_reason
                    if finish_reason is not None and not matcher.stopped:
                        text += matcher.flush()
                    record.text(choice.index, text)
                    if finish_reason is not None:  # counted before the client can see the end
                        ended = finish_reason
                        metrics.finish(finish_reason)
                    yield ChoiceDelta(choice.index, choice.prompt_index, text, out.new_token_ids, out.logprobs,
                                      decoded_len, finish_reason, out.num_cached_tokens)
                    decoded_len += len(decoded)
                    if finish_reason is not None:
                        return
        except Exception as e:
            ended = ended or "error"
            record.fail(e)
            raise
        finally:
            metrics.finish(ended or "abort")

    # ---- logprobs ---------------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        # A token holding part of a UTF-8 character decodes to U+FFFD, as in vLLM; `bytes` then carries
        # that character's bytes, not the token's raw bytes.
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, deltas: list[ChoiceDelta]) -> ChatLogprobs:
        def top(token_id: int, logprob: float) -> TopLogprob:
            text = self._token_text(token_id)
            return TopLogprob(token=text, logprob=max(logprob, MIN_LOGPROB), bytes=list(text.encode()))

        content = []
        for d in deltas:
            for token_id, lp in zip(d.token_ids, d.logprobs or ()):
                sampled = top(token_id, lp.logprob)
                content.append(ChatTokenLogprob(**sampled.model_dump(), top_logprobs=[top(t, v) for t, v in lp.top]))
        return ChatLogprobs(content=content)

    def _completion_logprobs(self, deltas: list[ChoiceDelta]) -> CompletionLogprobs:
        result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for d in deltas:
            offset = d.text_offset
            for token_id, lp in zip(d.token_ids, d.logprobs or ()):
                text = self._token_text(token_id)
                result.tokens.append(text)
                result.token_logprobs.append(max(lp.logprob, MIN_LOGPROB))
                result.top_logprobs.append({self._token_text(t): max(v, MIN_LOGPROB) for t, v in lp.top})
                result.text_offset.append(offset)
                offset += len(text)
        return result

    # ---- other protocols on the same path (TGI's native routes: llamaserve.api.tgi) ---------

    async def encode(self, text: str) -> list[int]:
        """A prompt's token ids, tokenized off the event loop as the OpenAI routes tokenize theirs."""
        return await self._off_loop(self.tokenizer.encode, text)

    def admit_prompt(self, raw: Request, request: CompletionRequest, prompt_ids: list[int], response_id: str,
                     logprobs: int | None, structured: StructuredOutput | None = None) -> "Generation":
        """One tokenized prompt admitted as /v1/completions admits its prompts (the engine alive, the model or
        adapter served, the server's limits and the context checked, concurrency slots reserved, the request
        measured, logged and traced), for a protocol that formats the deltas itself. `request` carries the
        sampling fields, its prompt (the text, for the request log) and `n` choices."""
        record = self.telemetry.start(raw, "text_completion", request, response_id)
        lora = self._check_serving(request.model)
        self._check_limits(request, 1)
        choices = self._choices(request, [prompt_ids], logprobs, "prompt", structured)
        return self._admit(raw, response_id, choices, request.priority, lora, record)


@dataclass
class Generation:
    """One admitted chat or completions request: its choices' engine requests, and the concurrency slots
    they hold until the response is over, however it ends."""

    serving: OpenAIServing
    response_id: str
    choices: list[ChoiceRequest]
    priority: int
    lora: str | None  # the LoRA adapter; None: the base model
    deadline: float | None  # time.monotonic(); None: none
    record: GenerationRecord
    release: Callable[[], None]

    def __post_init__(self):
        self._runs = [self.serving._run_choice(f"{self.response_id}-{c.index}", c, self) for c in self.choices]

    def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every choice's deltas, interleaved as they arrive."""
        return merge(self._runs)

    async def stream(self, raw: Request, events: AsyncIterator[str]) -> Response:
        """An SSE response of `events`, opened once the engine has accepted every choice's grammar: one it
        cannot compile is a 400, not an error event after a 200."""
        await self.accepted(raw)
        config = self.serving.config
        return event_stream(events, config.sse_ping_interval, config.sse_send_timeout, on_close=self.release)

    async def accepted(self, raw: Request) -> None:
        """Returns once the engine has accepted every choice's grammar (at once when none has one), for a
        stream to open only then; if it cannot (a grammar refused, the client gone), the choices are
        aborted, the slots released, and the error raised."""
        try:
            await cancel_on_disconnect(raw, self._grammars_accepted())
        except BaseException:
            for run in self._runs:
                await run.aclose()  # aborts the choices already in the engine
            self.release()
            raise

    async def _grammars_accepted(self) -> None:
        # The engine's first output for a constrained request is an empty notice (or the compile error);
        # choices share one compiled grammar, so waiting in turn costs one compile.
        for choice, run in zip(self.choices, self._runs):
            if choice.params.structured is not None:
                await anext(run)

    async def collect(self, raw: Request) -> tuple[dict[int, list[ChoiceDelta]], Usage]:
        """All deltas per choice, for a response sent whole; cancelled if the client goes away first."""
        try:
            return await cancel_on_disconnect(raw, self._collect())
        finally:
            self.release()

    async def _collect(self) -> tuple[dict[int, list[ChoiceDelta]], Usage]:
        deltas: dict[int, list[ChoiceDelta]] = {c.index: [] for c in self.choices}
        usage = UsageCounter(self.choices)
        async with aclosing(self.deltas()) as stream:
            async for d in stream:
                deltas[d.index].append(d)
                usage.add(d)
        return deltas, usage.usage()


def _delta_tool_call(piece: ToolCallDelta) -> DeltaToolCall:
    if piece.id is not None:  # a call's first delta: who is called, and no arguments yet
        return DeltaToolCall(index=piece.index, id=piece.id, type="function",
                             function=DeltaFunctionCall(name=piece.name, arguments=piece.arguments))
    return DeltaToolCall(index=piece.index, function=DeltaFunctionCall(arguments=piece.arguments))


# ---- HTTP plumbing ----------------------------------------------------------------------------


def json_response(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


async def cancel_on_disconnect(raw: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (and so aborting its engine requests) if the client goes away first:
    Starlette does not cancel a plain route when its client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnected(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise APIError(499, "the client closed the connection")  # nobody reads it: for the access log
    return task.result()


async def _disconnected(raw: Request) -> None:
    # The body was read already, so the next ASGI message is the disconnect.
    while (await raw.receive())["type"] != "http.disconnect":
        pass
