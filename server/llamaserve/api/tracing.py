"""OpenTelemetry spans for generation requests, exported over OTLP/HTTP when an endpoint is configured.

Off (no endpoint, no provider given), nothing here runs per request: the app holds no RequestTracer.
On, each chat or completions request gets one SERVER span, a child of the caller's W3C `traceparent`
when there is one, carrying the GenAI semantic-convention attributes and one event per stage
(queued, first scheduled, first token, finished) stamped with the engine's own times.
"""

import time
from collections.abc import Mapping
from importlib.metadata import version

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()  # W3C only; no process-global propagator is touched


def otlp_tracer_provider(endpoint: str):  # -> opentelemetry.sdk.trace.TracerProvider
    """A provider that batches spans to an OTLP/HTTP endpoint (e.g. http://collector:4318/v1/traces) from a
    background thread; a request only appends its span to the batch queue."""
    # The SDK and exporter load only when tracing is on.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = SDKTracerProvider(resource=Resource.create({"service.name": "llamaserve",
                                                        "service.version": version("llamaserve")}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def epoch_ns(monotonic: float) -> int:
    """A time.monotonic() stamp (the engine's clock) as the epoch nanoseconds spans are stamped in."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


class RequestTracer:
    def __init__(self, provider: TracerProvider):
        self._tracer = provider.get_tracer("llamaserve", version("llamaserve"))

    def start(self, name: str, headers: Mapping[str, str], start: float) -> Span:
        """A span begun at `start` (time.monotonic()), child of the trace context in `headers` if any."""
        parent = _PROPAGATOR.extract(headers)
        return self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER, start_time=epoch_ns(start))


def traceparent(span: Span) -> str:
    """The W3C traceparent header naming `span`, for the response."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier["traceparent"]


def end_span(span: Span, status: int, error: str | None) -> None:
    """Ends the span with the HTTP status; a server-side failure marks it as an error."""
    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_attribute("error.type", str(status))
    if status >= 500 or error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()
