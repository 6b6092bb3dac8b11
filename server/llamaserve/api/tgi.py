"""TGI's native protocol (Hugging Face text-generation-inference), beside the OpenAI routes and on the same
path: `POST /generate`, `POST /generate_stream`, `POST /` (either, by `stream`) and `GET /info`.

A TGI request becomes a completions request of `best_of` choices, admitted by OpenAIServing.admit_prompt, so
it shares the OpenAI routes' engine requests, limits, concurrency slots, deadlines, metrics, logs, traces
and API keys; only its parameters and its answers are TGI's:

- Greedy unless `do_sample`, or `temperature` (other than 1), `top_k` or `top_p` is given, as TGI decides.
  A sampled request without a `seed` gets a random one, reported in `details.seed` so it can be repeated.
- Finish reasons are TGI's: `length`, `eos_token`, `stop_sequence`; TGI's `generated_text` keeps the stop
  sequence that ended it (OpenAI's routes cut it).
- Tokens are described as TGI describes them: each with its own text (what it adds to the text decoded so
  far, special tokens written out, as TGI's `decode_token` gives them), its logprob and `special`. Clients
  that concatenate streamed tokens skip the special ones (the EOS token is sent, as TGI sends it).
- `best_of` samples that many sequences and answers with the one of highest mean logprob per token, the
  others in `details.best_of_sequences`.
- Errors are TGI's `{"error", "error_type"}`, with its status codes (422 for validation, 424 when the engine
  fails a request, 429 when overloaded), on these routes whoever raises them: `TGIErrorMiddleware` rewrites
  the OpenAI-shaped refusals of the middlewares (API keys, the drain, the body limit) and of the routes.
  In a stream, an error is one event of that shape and the stream ends; TGI's streams have no `[DONE]`.

Not served: `typical_p` and `watermark` (the sampler has neither), prompt logprobs (`decoder_input_details`
lists the prompt's tokens with `logprob: null`: the engine computes no prompt logprobs).
"""

import json
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from http import HTTPStatus
from importlib.metadata import version
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamaserve.api.errors import APIError, as_api_error, bad_request
from llamaserve.api.protocol import INT64_MAX, CompletionRequest, Text
from llamaserve.api.protocol import Request as StrictRequest
from llamaserve.api.serving import MIN_LOGPROB, ChoiceDelta, Generation, OpenAIServing, json_response
from llamaserve.api.streaming import EventStreamResponse
from llamaserve.engine.messages import TokenLogprobs
from llamaserve.sampling_params import StructuredOutput
from llamaserve.tokenizer import IncrementalDetokenizer, Tokenizer

PATHS = frozenset({"/generate", "/generate_stream", "/", "/info"})  # where errors take TGI's shape
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's, when a request does not say; null: whatever the context leaves

# ---- requests ---------------------------------------------------------------------------------


class Grammar(StrictRequest):
    """TGI's grammar: JSON following a schema (given as an object or as JSON text), or text matching a regex."""

    type: Literal["json", "regex"]
    value: dict[str, Any] | Text


class GenerateParameters(StrictRequest):
    """TGI's `parameters`, with its ranges (a temperature of 0 is refused: greedy is `do_sample: false`)."""

    adapter_id: Text | None = None  # a LoRA adapter served by name; None: the base model
    best_of: int | None = Field(None, ge=1)
    decoder_input_details: bool = False  # the prompt's tokens in details.prefill
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    grammar: Grammar | None = None
    max_new_tokens: int | None = Field(DEFAULT_MAX_NEW_TOKENS, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool | None = None  # None: false
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    stop: list[Text] | None = None
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_n_tokens: int | None = Field(None, ge=0, le=20)  # the most likely alternatives for each token
    top_p: float | None = Field(None, gt=0, lt=1)
    truncate: int | None = Field(None, ge=1)  # keep only the prompt's last `truncate` tokens
    typical_p: float | None = Field(None, gt=0, lt=1)  # refused: see the module docstring
    watermark: bool = False  # refused when true

    @property
    def sampling(self) -> bool:
        """TGI samples when asked to, or when a sampling parameter is given."""
        return (self.do_sample or self.temperature not in (None, 1.0) or self.top_k is not None
                or self.top_p is not None or self.typical_p is not None)


class GenerateRequest(StrictRequest):
    inputs: Text = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False  # read by the compat route `POST /` only


# ---- responses --------------------------------------------------------------------------------


def _none(value: Any) -> bool:
    return value is None


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None  # null: prompt logprobs are not computed


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = Field(None, exclude_if=_none)


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None  # the sampling seed; null when greedy
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = Field(None, exclude_if=_none)
    best_of_sequences: list[BestOfSequence] | None = Field(None, exclude_if=_none)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = Field(None, exclude_if=_none)


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    """One generated token; the last one also carries the whole text and the details."""

    index: int  # 1 for the first token
    token: Token
    top_tokens: list[Token]
    generated_text: str | None = None
    details: StreamDetails | None = None


class Info(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_dtype: str  # as torch names it: "torch.float32"
    model_device_type: str
    model_pipeline_tag: str = "text-generation"
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    router: str = "llamaserve"
    version: str
    sha: str | None = None
    docker_label: str | None = None


class TGIError(BaseModel):
    error: str
    error_type: str


# ---- errors -----------------------------------------------------------------------------------


def tgi_error(status: int, code: str | None, message: str) -> tuple[int, TGIError]:
    """TGI's status and error body for an error the OpenAI routes would answer with `status` and `code`."""
    if status in (400, 422, 413):  # bad input: TGI's validation errors are 422
        return (413 if status == 413 else 422), TGIError(error=message, error_type="validation")
    if status == 429:
        return status, TGIError(error=message, error_type="overloaded")
    if code == "engine_error":  # the engine failed the request while it ran: TGI's generation error
        return 424, TGIError(error=message, error_type="generation")
    try:
        phrase = HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:
        phrase = "error"
    return status, TGIError(error=message, error_type=code or phrase)


def _tgi_error_body(status: int, body: bytes) -> tuple[int, bytes]:
    try:
        info = json.loads(body)["error"]
        message, code = info["message"], info.get("code")
    except (ValueError, KeyError, TypeError):  # not ours (Starlette's plain-text 500): pass its text on
        message, code = body.decode(errors="replace") or HTTPStatus(status).phrase, None
    status, error = tgi_error(status, code, message)
    return status, error.model_dump_json().encode()


class TGIErrorMiddleware:
    """Error responses on TGI's routes in TGI's shape and status codes. It sits outside every middleware that
    refuses requests, so a refusal needs no knowledge of the protocol its route speaks; an error response is
    small and whole, so it is held until its end and rewritten. Other responses (streams) pass untouched."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in PATHS:
            return await self.app(scope, receive, send)
        start: Message | None = None
        body: list[bytes] = []

        async def send_tgi(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            status, payload = _tgi_error_body(start["status"], b"".join(body))
            headers = MutableHeaders(raw=list(start["headers"]))
            headers["content-type"] = "application/json"
            headers["content-length"] = str(len(payload))
            await send({"type": "http.response.start", "status": status, "headers": headers.raw})
            await send({"type": "http.response.body", "body": payload})

        await self.app(scope, receive, send_tgi)


async def _tgi_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events; an error once the stream has begun is one event in TGI's error shape, and the end."""
    try:
        async with aclosing(events):
            async for event in events:
                yield event
    except Exception as e:
        error = as_api_error(e)
        yield tgi_error(error.status, error.code, error.message)[1].model_dump_json()


# ---- serving ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """A TGI request as admitted: what its answers need beside the engine's outputs."""

    request: GenerateRequest
    prompt_ids: list[int]
    seed: int | None  # choice j's seed is seed + j; None: greedy
    generation: Generation


@dataclass
class Sequence:
    """One choice, finished, in TGI's terms."""

    generated_text: str  # without the prompt
    finish_reason: str
    tokens: list[Token]
    top_tokens: list[list[Token]] | None
    seed: int | None

    @property
    def mean_logprob(self) -> float:
        return sum(t.logprob or 0.0 for t in self.tokens) / max(len(self.tokens), 1)


class TGIServing:
    """TGI's routes over an OpenAIServing."""

    def __init__(self, serving: OpenAIServing, device: str):
        self.serving = serving
        self.tokenizer: Tokenizer = serving.tokenizer
        self._special: dict[int, bool] = {}
        config, ready = serving.config, serving.client.ready
        self._info = Info(model_id=serving.model_name, model_dtype=f"torch.{ready.dtype}",
                          model_device_type=device.split(":")[0], max_concurrent_requests=config.max_concurrent_requests,
                          max_best_of=config.max_n, max_stop_sequences=config.max_stop_strings,
                          max_input_tokens=serving.max_model_len - 1, max_total_tokens=serving.max_model_len,
                          version=version("llamaserve"))

    def info(self) -> Info:
        return self._info

    async def generate(self, request: GenerateRequest, raw: Request, as_list: bool = False) -> Response:
        """The whole answer; `as_list`: inside a one-element list, as TGI's compat route answers."""
        plan = await self._admit(request, raw, stream=False)
        deltas, _ = await plan.generation.collect(raw)
        sequences = [self._sequence(plan, i, ds) for i, ds in deltas.items()]
        best = max(range(len(sequences)), key=lambda i: sequences[i].mean_logprob)
        params, prefix = request.parameters, request.inputs if request.parameters.return_full_text else ""
        details = None
        if params.details:
            prefill = self._prefill(plan.prompt_ids) if params.decoder_input_details else []
            chosen = sequences[best]
            others = [BestOfSequence(generated_text=prefix + s.generated_text, finish_reason=s.finish_reason,
                                     generated_tokens=len(s.tokens), seed=s.seed, prefill=prefill, tokens=s.tokens,
                                     top_tokens=s.top_tokens)
                      for i, s in enumerate(sequences) if i != best]
            details = Details(finish_reason=chosen.finish_reason, generated_tokens=len(chosen.tokens), seed=chosen.seed,
                              prefill=prefill, tokens=chosen.tokens, top_tokens=chosen.top_tokens,
                              best_of_sequences=others or None)
        answer = GenerateResponse(generated_text=prefix + sequences[best].generated_text, details=details)
        response = (Response(f"[{answer.model_dump_json()}]", media_type="application/json") if as_list
                    else json_response(answer))
        response.headers["x-prompt-tokens"] = str(len(plan.prompt_ids))  # as TGI's
        response.headers["x-generated-tokens"] = str(len(sequences[best].tokens))
        return response

    async def generate_stream(self, request: GenerateRequest, raw: Request) -> Response:
        """Server-sent events, one per generated token; the last carries the text and the details."""
        plan = await self._admit(request, raw, stream=True)
        prefix = request.inputs if request.parameters.return_full_text else ""

        async def events() -> AsyncIterator[str]:
            texts = IncrementalDetokenizer(self.tokenizer, plan.prompt_ids, skip_special_tokens=False)
            kept: list[str] = []
            token_ids: list[int] = []
            index = 0
            async for d in plan.generation.deltas():
                kept.append(d.text)
                token_ids += d.token_ids
                tokens, top = self._tokens(texts, d)
                for k, token in enumerate(tokens):
                    index += 1
                    event = StreamResponse(index=index, token=token, top_tokens=top[k] if top else [])
                    if d.finish_reason is not None and k == len(tokens) - 1:
                        text, finish_reason = self._ending(plan, "".join(kept), token_ids, d.finish_reason)
                        event.generated_text = prefix + text
                        event.details = StreamDetails(finish_reason=finish_reason, generated_tokens=len(token_ids),
                                                      seed=plan.seed, input_length=len(plan.prompt_ids))
                    yield event.model_dump_json()

        await plan.generation.accepted(raw)
        config = self.serving.config
        return EventStreamResponse(_tgi_events(events()), config.sse_ping_interval, config.sse_send_timeout,
                                   on_close=plan.generation.release)

    # ---- a TGI request -> a completions request --------------------------------------------

    async def _admit(self, request: GenerateRequest, raw: Request, stream: bool) -> Plan:
        params = request.parameters
        best_of = params.best_of or 1
        if params.typical_p is not None:
            raise bad_request("`typical_p` (typical decoding) is not supported by this server")
        if params.watermark:
            raise bad_request("`watermark` is not supported by this server")
        if best_of > 1:
            if not params.sampling:
                raise bad_request("you must use sampling when `best_of` is > 1")
            if params.seed is not None:
                raise bad_request("`seed` must not be set when `best_of` is > 1")
            if stream:
                raise bad_request("`best_of` != 1 is not supported when streaming tokens")
            if best_of > self.serving.config.max_n:
                raise bad_request(f"`best_of` must be <= {self.serving.config.max_n}. Given: {best_of}")
        prompt_ids = await self.serving.encode(request.inputs)
        if params.truncate is not None:
            prompt_ids = prompt_ids[-params.truncate:]  # TGI keeps the end of the prompt
        max_new_tokens = self._max_new_tokens(len(prompt_ids), params.max_new_tokens)
        seed = params.seed
        if params.sampling and seed is None:  # TGI reports the seed it drew, so the answer can be repeated
            seed = secrets.randbelow(INT64_MAX - self.serving.config.max_n)
        completion = CompletionRequest.model_construct(
            model=params.adapter_id, prompt=request.inputs, max_tokens=max_new_tokens,
            temperature=(params.temperature or 1.0) if params.sampling else 0.0,
            top_p=params.top_p or 1.0, top_k=params.top_k or 0,
            repetition_penalty=params.repetition_penalty or 1.0, frequency_penalty=params.frequency_penalty or 0.0,
            seed=seed, stop=params.stop or [], n=best_of, stream=stream,
        )
        wants_logprobs = params.details or stream or best_of > 1
        logprobs = (params.top_n_tokens or 0) if wants_logprobs else None
        generation = self.serving.admit_prompt(raw, completion, prompt_ids, f"tgi-{uuid.uuid4().hex}", logprobs,
                                               _structured(params.grammar))
        return Plan(request, prompt_ids, seed if params.sampling else None, generation)

    def _max_new_tokens(self, num_input_tokens: int, requested: int | None) -> int:
        """max_new_tokens checked against the context in TGI's words; None: whatever the context leaves."""
        total = self.serving.max_model_len
        if num_input_tokens >= total:
            raise bad_request(f"`inputs` must have less than {total} tokens. Given: {num_input_tokens}")
        max_new_tokens = total - num_input_tokens if requested is None else requested
        if num_input_tokens + max_new_tokens > total:
            raise bad_request(f"`inputs` tokens + `max_new_tokens` must be <= {total}. Given: {num_input_tokens} "
                              f"`inputs` tokens and {max_new_tokens} `max_new_tokens`")
        return max_new_tokens

    # ---- engine outputs -> TGI's answers -----------------------------------------------------

    def _sequence(self, plan: Plan, index: int, deltas: list[ChoiceDelta]) -> Sequence:
        texts = IncrementalDetokenizer(self.tokenizer, plan.prompt_ids, skip_special_tokens=False)
        tokens: list[Token] = []
        top_tokens: list[list[Token]] = []
        for d in deltas:
            new, top = self._tokens(texts, d)
            tokens += new
            top_tokens += top
        text, finish_reason = self._ending(plan, "".join(d.text for d in deltas), [t.id for t in tokens],
                                           deltas[-1].finish_reason)
        seed = None if plan.seed is None else plan.seed + index
        return Sequence(text, finish_reason, tokens, top_tokens if plan.request.parameters.top_n_tokens else None, seed)

    def _tokens(self, texts: IncrementalDetokenizer, delta: ChoiceDelta) -> tuple[list[Token], list[list[Token]]]:
        """The delta's tokens with their own texts, and their top alternatives (empty without top_n_tokens)."""
        logprobs: list[TokenLogprobs | None] = list(delta.logprobs or [None] * len(delta.token_ids))
        tokens, top = [], []
        for token_id, lp in zip(delta.token_ids, logprobs):
            logprob = None if lp is None else max(lp.logprob, MIN_LOGPROB)
            tokens.append(Token(id=token_id, text=texts.push([token_id]), logprob=logprob,
                                special=self._is_special(token_id)))
            if lp is not None and lp.top:
                top.append([self._token(t, v) for t, v in lp.top])
        return tokens, top

    def _ending(self, plan: Plan, kept: str, token_ids: list[int], finish_reason: str) -> tuple[str, str]:
        """The generated text in TGI's terms (with the stop sequence that ended it) and TGI's finish reason.
        `kept` is the text the OpenAI routes would send: cut before a stop string."""
        if finish_reason == "length":
            return kept, "length"
        params = plan.generation.choices[0].params
        if token_ids and (token_ids[-1] in params.stop_token_ids or token_ids[-1] in self.tokenizer.eos_token_ids):
            return kept, "eos_token"
        # A stop string ended it: the first to end after `kept`, so the shortest that starts there.
        tail = IncrementalDetokenizer(self.tokenizer, plan.prompt_ids).push(token_ids)[len(kept):]
        matched = [s for s in params.stop if s and tail.startswith(s)]
        return kept + min(matched, key=len, default=""), "stop_sequence"

    def _prefill(self, prompt_ids: list[int]) -> list[PrefillToken]:
        return [PrefillToken(id=t, text=self.tokenizer.decode([t], skip_special_tokens=False), logprob=None)
                for t in prompt_ids]

    def _token(self, token_id: int, logprob: float) -> Token:
        return Token(id=token_id, text=self.tokenizer.decode([token_id], skip_special_tokens=False),
                     logprob=max(logprob, MIN_LOGPROB), special=self._is_special(token_id))

    def _is_special(self, token_id: int) -> bool:
        """A special token is one that decoding without special tokens drops."""
        special = self._special.get(token_id)
        if special is None:
            special = self._special[token_id] = (self.tokenizer.decode([token_id]) == ""
                                                 and self.tokenizer.decode([token_id], skip_special_tokens=False) != "")
        return special


def _structured(grammar: Grammar | None) -> StructuredOutput | None:
    if grammar is None:
        return None
    if grammar.type == "regex":
        if not isinstance(grammar.value, str) or not grammar.value:
            raise bad_request("a `regex` grammar's `value` must be a non-empty pattern")
        return StructuredOutput("regex", grammar.value)
    schema = grammar.value
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise bad_request(f"the grammar's JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise bad_request("a `json` grammar's `value` must be a JSON schema (an object)")
    # The canonical text api.structured gives a schema, so both protocols share the engine's grammar cache.
    return StructuredOutput("json", json.dumps(schema, ensure_ascii=False, separators=(",", ":")))


# ---- routes -----------------------------------------------------------------------------------

ERRORS = {status: {"model": TGIError} for status in (401, 413, 422, 424, 429, 503)}
STREAM = {"description": "server-sent events: one StreamResponse per token", "content": {"text/event-stream": {}}}

router = APIRouter(tags=["TGI"])


async def get_tgi(raw: Request) -> TGIServing:
    tgi = raw.app.state.tgi
    if tgi is None:
        raise APIError(503, "the server is not ready", code="not_ready")
    return tgi


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(request: GenerateRequest, raw: Request, tgi: TGIServing = Depends(get_tgi)) -> Response:
    """TGI's generate: the generated text, and with `details` its tokens."""
    return await tgi.generate(request, raw)


@router.post("/generate_stream", responses={**ERRORS, 200: STREAM})
async def generate_stream(request: GenerateRequest, raw: Request, tgi: TGIServing = Depends(get_tgi)) -> Response:
    """TGI's generate_stream: one event per token, the text and details on the last."""
    return await tgi.generate_stream(request, raw)


@router.post("/", response_model=list[GenerateResponse], responses={**ERRORS, 200: STREAM})
async def compat_generate(request: GenerateRequest, raw: Request, tgi: TGIServing = Depends(get_tgi)) -> Response:
    """TGI's compat route: generate_stream with `stream: true`, else generate's answer in a list."""
    if request.stream:
        return await tgi.generate_stream(request, raw)
    return await tgi.generate(request, raw, as_list=True)


@router.get("/info", responses=ERRORS)
async def info(tgi: TGIServing = Depends(get_tgi)) -> Info:
    """The model and the server's limits, as TGI describes them."""
    return tgi.info()
