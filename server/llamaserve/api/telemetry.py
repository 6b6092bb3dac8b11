"""What the server records about each request: metrics, a span, a log line, and the ids that tie them.

`TelemetryMiddleware` wraps every HTTP request: it stamps its start, gives it a request id (the caller's
`x-request-id`, or a new one) and returns that id, with the span's `traceparent` when tracing is on, in
the response headers; once the last byte is sent it counts the request by route and status. Chat and
completions requests also get a `GenerationRecord`, fed by the serving code as outputs arrive, which
ends in the span and the request log line.
"""

import time
import uuid
from collections.abc import Sequence
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamaserve.api.metrics import Metrics, RequestMetrics
from llamaserve.api.protocol import ChatCompletionRequest, SamplingRequest
from llamaserve.api.request_log import log_request
from llamaserve.api.tracing import RequestTracer, end_span, epoch_ns, traceparent

MAX_REQUEST_ID_LEN = 128
_RECORD = "generation_record"  # a request's GenerationRecord in its ASGI scope state (Request.state)


class GenerationRecord:
    """One chat or completions request as it is measured: its choices' metrics, span and logged text."""

    def __init__(self, telemetry: "Telemetry", operation: str, request: SamplingRequest, response_id: str,
                 raw: Request):
        self.telemetry = telemetry
        self.operation = operation  # GenAI operation name: "chat" | "text_completion"
        self.request = request
        self.response_id = response_id
        self.request_id: str = raw.state.request_id
        self.route = raw.url.path
        self.start: float = raw.state.start_time
        self.choices: list[RequestMetrics] = []
        self.prompt_lengths: dict[int, int] = {}  # prompt index -> tokens: a prompt counts once, however many choices
        self.texts: list[list[str]] | None = None  # per choice, with --log-requests only
        self.error: str | None = None
        self.span = None
        self.traceparent: str | None = None
        if telemetry.tracer is not None:
            name = f"{operation} {request.model or telemetry.metrics.model_name}"
            self.span = telemetry.tracer.start(name, raw.headers, self.start)
            self.traceparent = traceparent(self.span)

    def track(self, prompts: Sequence[tuple[int, list[int]]]) -> None:
        """Starts one engine request's metrics per (prompt index, prompt ids) choice, in choice order."""
        self.choices = [RequestMetrics(self.telemetry.metrics, self.start, len(ids)) for _, ids in prompts]
        self.prompt_lengths = {p: len(ids) for p, ids in prompts}
        if self.telemetry.log_requests:
            self.texts = [[] for _ in prompts]

    def text(self, index: int, text: str) -> None:
        if self.texts is not None:
            self.texts[index].append(text)

    def fail(self, error: Exception) -> None:
        self.error = getattr(error, "message", None) or f"{type(error).__name__}: {error}"

    def finish(self, status: int, seconds: float) -> None:
        """Closes the record once its response is sent: choices still open were cut short by the client."""
        for choice in self.choices:
            choice.finish("abort")
        fields = self.log_fields(status, seconds)
        if self.span is not None:
            self._end_span(status, fields)
        log_request(fields)

    def log_fields(self, status: int, seconds: float) -> dict[str, Any]:
        first = min((c for c in self.choices if c.first_token_time is not None),
                    key=lambda c: c.first_token_time, default=None)
        fields = {
            "id": self.response_id, "request_id": self.request_id,
            "trace_id": format(self.span.get_span_context().trace_id, "032x") if self.span is not None else None,
            "route": self.route, "model": self.telemetry.metrics.model_name, "status": status,
            "stream": self.request.stream, "prompt_tokens": sum(self.prompt_lengths.values()),
            "output_tokens": sum(c.num_output_tokens for c in self.choices),
            "cached_tokens": sum(c.num_cached_tokens for c in self.choices),
            "queue_time_s": _seconds(first.first_scheduled_time - first.arrival_time) if first else None,
            "ttft_s": _seconds(first.first_token_time - self.start) if first else None,
            "total_time_s": _seconds(seconds),
            "finish_reasons": [c.finish_reason for c in self.choices], "error": self.error,
        }
        if self.texts is not None:
            if isinstance(self.request, ChatCompletionRequest):
                fields["prompt"] = [m.model_dump(exclude_none=True) for m in self.request.messages]
            else:
                fields["prompt"] = self.request.prompt
            fields["outputs"] = ["".join(parts) for parts in self.texts]
        return fields

    def _end_span(self, status: int, fields: dict[str, Any]) -> None:
        span, request = self.span, self.request
        max_tokens = request.max_completion_tokens or request.max_tokens
        attributes = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.request.model": request.model or self.telemetry.metrics.model_name,
            "gen_ai.request.temperature": request.temperature, "gen_ai.request.top_p": request.top_p,
            "gen_ai.response.id": self.response_id, "gen_ai.response.model": self.telemetry.metrics.model_name,
            "gen_ai.usage.input_tokens": fields["prompt_tokens"],
            "gen_ai.usage.output_tokens": fields["output_tokens"],
            "gen_ai.response.finish_reasons": [r or "none" for r in fields["finish_reasons"]],
            "llamaserve.request_id": self.request_id, "llamaserve.stream": request.stream,
        }
        if max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = max_tokens
        if request.n > 1:
            attributes["gen_ai.request.choice.count"] = request.n
        if request.seed is not None:
            attributes["gen_ai.request.seed"] = request.seed
        span.set_attributes(attributes)
        for index, choice in enumerate(self.choices):
            extra = {"gen_ai.choice.index": index} if len(self.choices) > 1 else {}
            for event, stamp in (("queued", choice.arrival_time), ("first_scheduled", choice.first_scheduled_time),
                                 ("first_token", choice.first_token_time), ("finished", choice.finished_time)):
                if stamp is not None:
                    span.add_event(event, extra, timestamp=epoch_ns(stamp))
        end_span(span, status, self.error)


def _seconds(value: float) -> float:
    return round(value, 4)


class Telemetry:
    """The app's metrics, its tracer (None: tracing off) and whether request logs carry text."""

    def __init__(self, metrics: Metrics, tracer: RequestTracer | None, log_requests: bool):
        self.metrics = metrics
        self.tracer = tracer
        self.log_requests = log_requests

    def start(self, raw: Request, operation: str, request: SamplingRequest, response_id: str) -> GenerationRecord:
        record = GenerationRecord(self, operation, request, response_id, raw)
        setattr(raw.state, _RECORD, record)
        return record


class TelemetryMiddleware:
    """Request ids, trace headers and HTTP metrics around every request (pure ASGI, so streams pass as
    they are). The app's Telemetry exists once the model is loaded; before that only ids are given."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        state = scope.setdefault("state", {})
        request_id = _request_id(scope)
        state.update(start_time=start, request_id=request_id)
        status = 500  # unless a response starts: an exception escaped to Starlette's error handler

        async def send_with_ids(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append("x-request-id", request_id)
                record = state.get(_RECORD)
                if record is not None and record.traceparent is not None:
                    headers.append("traceparent", record.traceparent)
            await send(message)

        try:
            await self.app(scope, receive, send_with_ids)
        finally:
            telemetry: Telemetry | None = getattr(scope["app"].state, "telemetry", None)
            if telemetry is not None:
                seconds = time.monotonic() - start
                route = scope.get("route")
                telemetry.metrics.observe_http(scope["method"], getattr(route, "path", "unmatched"), status, seconds)
                record = state.get(_RECORD)
                if record is not None:
                    record.finish(status, seconds)


def _request_id(scope: Scope) -> str:
    """The caller's x-request-id when it is a sane token, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if 0 < len(text) <= MAX_REQUEST_ID_LEN and text.isprintable() and text.isascii():
                return text
            break
    return uuid.uuid4().hex
