"""Tracing and request logs: spans read from an in-memory exporter inside an in-process server (real uvicorn,
real HTTP, real engine process), then a server process exporting over OTLP/HTTP to a receiver of our own."""

import json
import logging
import threading
import time

import httpx
import pytest
import uvicorn
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llamaserve.api.app import create_app
from llamaserve.config import load_config
from tests.e2e.conftest import STARTUP_TIMEOUT, Server, free_port
from tests.e2e.otlp_receiver import OTLPReceiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SECRET = "Zanzibar marmalade"  # prompt text that must never reach a log unless asked for
# The request log line's fields, as the README documents them.
LOG_FIELDS = {"id", "request_id", "trace_id", "route", "model", "status", "stream", "prompt_tokens", "output_tokens",
              "cached_tokens", "queue_time_s", "ttft_s", "total_time_s", "finish_reasons", "error"}


class InProcessServer:
    """The app under uvicorn in a thread of this process, so the test can hold its tracer provider."""

    def __init__(self, provider: TracerProvider, **options):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        engine_config, server_config = load_config(None, port=port, kv_cache_gib=0.25, max_num_seqs=16, **options)
        app = create_app(engine_config, server_config, tracer_provider=provider)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def traced():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = InProcessServer(provider, log_requests=True)
    yield server, exporter
    server.stop()


def finished_span(exporter: InMemorySpanExporter, trace_id: str):
    """The one span of `trace_id`, once ended (just after the response's last byte)."""
    deadline = time.monotonic() + 10
    while True:
        spans = [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
        if spans:
            assert len(spans) == 1
            return spans[0]
        assert time.monotonic() < deadline, f"no span for trace {trace_id}"
        time.sleep(0.02)


def test_a_request_is_a_child_span_of_the_callers_trace(traced):
    server, exporter = traced
    body = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 4, "temperature": 0.5,
            "ignore_eos": True, "model": "SmolLM2-135M-Instruct"}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60,
                          headers={"traceparent": TRACEPARENT, "x-request-id": "lb-7"})
    assert response.status_code == 200
    usage = response.json()["usage"]
    span = finished_span(exporter, TRACE_ID)

    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_ID
    assert span.kind == SpanKind.SERVER and span.name == "chat SmolLM2-135M-Instruct"
    assert response.headers["traceparent"] == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"
    assert response.headers["x-request-id"] == "lb-7"
    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "SmolLM2-135M-Instruct"
    assert a["gen_ai.request.max_tokens"] == 4 and a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"] > 0
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("length",)
    assert a["gen_ai.response.id"] == response.json()["id"] and a["llamaserve.request_id"] == "lb-7"
    assert a["http.response.status_code"] == 200 and span.status.status_code == StatusCode.UNSET
    # Where the time went, in order, inside the span.
    assert [e.name for e in span.events] == ["queued", "first_scheduled", "first_token", "finished"]
    stamps = [span.start_time, *(e.timestamp for e in span.events), span.end_time]
    assert stamps == sorted(stamps)


def test_without_traceparent_a_streamed_request_starts_a_trace(traced):
    server, exporter = traced
    body = {"prompt": "Once upon a time", "max_tokens": 3, "stream": True, "n": 2}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        response.read()
        trace_id = response.headers["traceparent"].split("-")[1]
    span = finished_span(exporter, trace_id)
    assert span.parent is None and span.name == "text_completion SmolLM2-135M-Instruct"
    assert span.attributes["gen_ai.usage.output_tokens"] == 6 and span.attributes["gen_ai.request.choice.count"] == 2
    assert "gen_ai.request.max_tokens" in span.attributes
    assert sorted(e.attributes["gen_ai.choice.index"] for e in span.events if e.name == "first_token") == [0, 1]


def test_a_refused_request_still_ends_its_span(traced):
    server, exporter = traced
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5000}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    span = finished_span(exporter, response.headers["traceparent"].split("-")[1])
    assert span.attributes["http.response.status_code"] == 400 and span.attributes["error.type"] == "400"
    assert span.events == ()


def test_log_requests_puts_the_text_in_the_log_line(traced, caplog):
    server, _ = traced
    caplog.set_level(logging.INFO, logger="llamaserve.requests")
    body = {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 3, "temperature": 0}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
    deadline = time.monotonic() + 5
    while not (lines := [r for r in caplog.records if getattr(r, "fields", {}).get("id") == response["id"]]):
        assert time.monotonic() < deadline, "no request log line"
        time.sleep(0.02)
    fields = lines[0].fields
    assert set(fields) == LOG_FIELDS | {"prompt", "outputs"}
    assert fields["prompt"] == [{"role": "user", "content": SECRET}]
    assert fields["outputs"] == [response["choices"][0]["message"]["content"]]
    assert fields["trace_id"] is not None and fields["finish_reasons"] == ["length"]


def test_spans_reach_an_otlp_receiver_and_logs_are_json_without_text(tmp_path):
    with OTLPReceiver() as receiver:
        server = Server(tmp_path, "--otlp-traces-endpoint", receiver.endpoint, "--log-format", "json")
        try:
            body = {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 3, "stream": True,
                    "stream_options": {"include_usage": True}}
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60,
                              headers={"traceparent": TRACEPARENT}) as response:
                events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
            assert response.headers["traceparent"].split("-")[1] == TRACE_ID
        finally:
            server.stop()  # a graceful stop exports the spans still batched
        [(resource, span)] = [(r, s) for r, s in receiver.spans() if s.trace_id.hex() == TRACE_ID]
    assert resource["service.name"] == "llamaserve" and span.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value for a in span.attributes}
    assert attributes["gen_ai.usage.output_tokens"].int_value == 3
    assert [e.name for e in span.events] == ["queued", "first_scheduled", "first_token", "finished"]

    log = server.log_path.read_text()
    assert SECRET not in log
    lines = [json.loads(x) for x in log.splitlines() if x.strip()]  # every line, the engine's too, is JSON
    assert any(line.get("process") == "engine" for line in lines)
    assert any(line["logger"] == "llamaserve.server" and line["message"] == "ready" for line in lines)
    [line] = [json.loads(x) for x in log.splitlines() if '"llamaserve.requests"' in x]
    assert set(line) == LOG_FIELDS | {"time", "level", "logger", "message"}
    assert line["id"] == events[0]["id"] and line["trace_id"] == TRACE_ID and line["status"] == 200
    assert line["prompt_tokens"] == events[-1]["usage"]["prompt_tokens"] and line["output_tokens"] == 3
    assert line["finish_reasons"] == ["length"] and line["stream"] is True and line["error"] is None
    assert 0 <= line["queue_time_s"] <= line["ttft_s"] <= line["total_time_s"]
