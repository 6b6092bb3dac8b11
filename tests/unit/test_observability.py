"""Observability pieces without a server: per-request metrics from engine outputs, the engine collector,
rejection reasons, log formats, and the configuration and flags that turn them on."""

import argparse
import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamaserve.api.errors import APIError, bad_request
from llamaserve.api.metrics import Metrics, RequestMetrics, rejection_reason
from llamaserve.api.request_log import logging_config
from llamaserve.logs import JsonFormatter, TextFormatter
from llamaserve.cli import add_serve_parser
from llamaserve.config import ServerConfig, load_config
from llamaserve.engine.client import EngineReady
from llamaserve.engine.messages import ITERATION_TOKENS_BUCKETS, EngineStats, RequestOutput

READY = EngineReady(num_kv_blocks=100, block_size=16, max_model_len=2048, vocab_size=256, checkpoint="/x",
                    dtype="bfloat16", tensor_parallel_size=2)


def samples(metrics: Metrics) -> dict[tuple, float]:
    text = metrics.render().decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def outputs(num_tokens: int, finish_reason: str = "length") -> list[RequestOutput]:
    """A request's outputs as the engine sends them: arrival 10.0, scheduled 10.5, tokens every 0.25 s from 11.0."""
    stamps = dict(arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.0)
    return [RequestOutput("r", [7], finish_reason if i == num_tokens - 1 else None, num_prompt_tokens=5,
                          token_time=11.0 + 0.25 * i, finished_time=11.0 + 0.25 * i if i == num_tokens - 1 else None,
                          **stamps)
            for i in range(num_tokens)]


def test_a_request_is_measured_from_its_outputs():
    metrics = Metrics("m", READY, EngineStats)
    request = RequestMetrics(metrics, start=9.0, num_prompt_tokens=5)
    for out in outputs(4):
        request.output(out)
    request.finish("length")
    request.finish("abort")  # a second finish (the record closing) changes nothing
    s = samples(metrics)
    assert s[("llamaserve_time_to_first_token_seconds_sum", ())] == 2.0  # 11.0 - 9.0
    assert s[("llamaserve_inter_token_latency_seconds_count", ())] == 3
    assert s[("llamaserve_inter_token_latency_seconds_sum", ())] == 0.75
    assert s[("llamaserve_e2e_request_latency_seconds_sum", ())] == 2.75  # 11.75 - 9.0
    assert s[("llamaserve_request_queue_time_seconds_sum", ())] == 0.5
    assert s[("llamaserve_request_prefill_time_seconds_sum", ())] == 0.5
    assert s[("llamaserve_request_decode_time_seconds_sum", ())] == 0.75
    assert s[("llamaserve_generation_tokens_total", ())] == 4 and s[("llamaserve_prompt_tokens_total", ())] == 5
    assert s[("llamaserve_request_success_total", (("finished_reason", "length"),))] == 1
    assert s[("llamaserve_request_success_total", (("finished_reason", "abort"),))] == 0


def test_a_request_cut_short_counts_its_tokens_but_not_its_latency():
    metrics = Metrics("m", READY, EngineStats)
    request = RequestMetrics(metrics, start=9.0, num_prompt_tokens=5)
    for out in outputs(3)[:2]:
        request.output(out)
    request.finish("abort")
    s = samples(metrics)
    assert s[("llamaserve_request_success_total", (("finished_reason", "abort"),))] == 1
    assert s[("llamaserve_time_to_first_token_seconds_count", ())] == 1
    assert s[("llamaserve_generation_tokens_total", ())] == 2
    assert s[("llamaserve_e2e_request_latency_seconds_count", ())] == 0


def test_engine_stats_are_exported_as_they_were_last_sent():
    counts = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
    counts[0], counts[ITERATION_TOKENS_BUCKETS.index(512)], counts[-1] = 10, 2, 1  # 10 decodes, 2 prefills, 1 huge
    stats = EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, preemptions=4, prefix_queried_tokens=90,
                        prefix_hit_tokens=32, computed_tokens=10 + 2 * 500 + 20000, iteration_tokens_counts=counts)
    s = samples(Metrics("m", READY, lambda: stats))
    assert s[("llamaserve_num_requests_running", ())] == 3 and s[("llamaserve_num_requests_waiting", ())] == 2
    assert s[("llamaserve_kv_cache_usage_ratio", ())] == 0.25 and s[("llamaserve_preemptions_total", ())] == 4
    assert s[("llamaserve_prefix_cache_queries_total", ())] == 90 and s[("llamaserve_prefix_cache_hits_total", ())] == 32
    assert s[("llamaserve_iteration_tokens_bucket", (("le", "1.0"),))] == 10
    assert s[("llamaserve_iteration_tokens_bucket", (("le", "256.0"),))] == 10
    assert s[("llamaserve_iteration_tokens_bucket", (("le", "512.0"),))] == 12
    assert s[("llamaserve_iteration_tokens_bucket", (("le", "+Inf"),))] == 13
    assert s[("llamaserve_iteration_tokens_count", ())] == 13 and s[("llamaserve_iteration_tokens_sum", ())] == 21010
    info = {k: v for (name, labels), _ in s.items() if name == "llamaserve_engine_info" for k, v in labels}
    assert info["dtype"] == "bfloat16" and info["tensor_parallel_size"] == "2" and info["num_kv_blocks"] == "100"


@pytest.mark.parametrize("error, reason", [
    (bad_request("Invalid value for 'temperature'", "temperature"), "validation"),
    (APIError(404, "no such model", "model", "model_not_found"), "validation"),
    (bad_request("too long", "max_tokens", "context_length_exceeded"), "too_long"),
    (APIError(503, "the inference engine is not running", code="engine_dead"), "overloaded"),
    (APIError(429, "slow down"), "overloaded"),
    (APIError(401, "bad key"), "unauthorized"),
    (APIError(499, "the client closed the connection"), None),
    (APIError(500, "internal server error"), None),
])
def test_rejection_reasons(error, reason):
    assert rejection_reason(error) == reason


def record(**fields) -> logging.LogRecord:
    attributes = {"name": "llamaserve.requests", "levelno": logging.INFO, "levelname": "INFO", "msg": "request"}
    return logging.makeLogRecord({**attributes, "fields": fields} if fields else attributes)


def test_json_lines_carry_the_fields_at_the_top():
    line = json.loads(JsonFormatter().format(record(id="chatcmpl-1", status=200, error=None, finish_reasons=["stop"])))
    assert line["logger"] == "llamaserve.requests" and line["level"] == "info" and line["message"] == "request"
    assert line["id"] == "chatcmpl-1" and line["status"] == 200 and line["error"] is None
    assert line["finish_reasons"] == ["stop"] and line["time"].endswith("+00:00")


def test_text_lines_are_key_value_pairs():
    text = TextFormatter().format(record(id="chatcmpl-1", status=200, error=None, model="my model",
                                         finish_reasons=["stop"]))
    assert text.endswith(' request id=chatcmpl-1 status=200 model="my model" finish_reasons=["stop"]')
    assert TextFormatter().format(record()).endswith("llamaserve.requests: request")


def test_logging_config_adds_our_loggers_in_the_chosen_format():
    text, as_json = logging_config("text", "info"), logging_config("json", "debug")
    assert text["loggers"]["llamaserve"]["level"] == "INFO" and as_json["loggers"]["llamaserve"]["level"] == "DEBUG"
    assert text["formatters"]["llamaserve"]["()"].endswith("TextFormatter")
    assert {f["()"] for f in as_json["formatters"].values()} == {"llamaserve.logs.JsonFormatter"}
    assert text["formatters"]["default"]["()"] == "uvicorn.logging.DefaultFormatter"  # uvicorn's lines unchanged


def test_server_config_refuses_bad_observability_values():
    assert ServerConfig().otlp_traces_endpoint is None and not ServerConfig().log_requests
    with pytest.raises(ValueError, match="log_format"):
        ServerConfig(log_format="xml")
    with pytest.raises(ValueError, match="otlp_traces_endpoint"):
        ServerConfig(otlp_traces_endpoint="collector:4318")


def test_yaml_keys_reach_the_server_config(tmp_path):
    path = tmp_path / "deploy.yaml"
    path.write_text("log_format: json\nlog_requests: true\notlp_traces_endpoint: http://collector:4318/v1/traces\n")
    _, server = load_config(path)
    assert server.log_format == "json" and server.log_requests
    assert server.otlp_traces_endpoint == "http://collector:4318/v1/traces"


def serve_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_the_standard_otel_variable_is_read_by_the_cli_only(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://env:4318/v1/traces")
    args = serve_flags()
    assert args.otlp_traces_endpoint == "http://env:4318/v1/traces" and args.log_requests is None
    args = serve_flags("--otlp-traces-endpoint", "http://flag:4318/v1/traces", "--log-format", "json", "--log-requests")
    assert args.otlp_traces_endpoint == "http://flag:4318/v1/traces" and args.log_format == "json" and args.log_requests
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    assert serve_flags().otlp_traces_endpoint is None
