"""Prometheus metrics, served at GET /metrics. The names are a public interface (README, docker/ dashboard).

Two sources, one registry per app:
- per-request numbers (latencies, tokens, finish reasons, rejections, HTTP) are observed in the API
  process as requests progress, from the engine's time.monotonic() stamps on each RequestOutput;
- engine numbers (load, KV usage, preemptions, prefix cache, tokens per step) travel with every step's
  outputs as EngineStats and are read only when Prometheus scrapes (EngineCollector): the step loop
  does no metrics work beyond its counters.
Every series carries `model_name`, so several servers can share one Prometheus.
"""

from collections.abc import Callable, Iterator
from importlib.metadata import version

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from llamaserve.api.errors import APIError
from llamaserve.engine.client import EngineReady
from llamaserve.engine.messages import ITERATION_TOKENS_BUCKETS, EngineStats, RequestOutput

# Without this, every counter and histogram also exports a `_created` timestamp series nobody graphs.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# Buckets span a 135M model on a CPU (tens of ms per token, seconds of queueing under load) to a 70B
# model on GPUs (a few ms per token, long prompts, minutes of queueing when overloaded).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
REQUEST_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                        60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000,
                       200000)
HTTP_TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                     600.0)

FINISH_REASONS = ("stop", "length", "abort", "error")
REJECTION_REASONS = ("validation", "overloaded", "too_long", "unauthorized", "draining")
# The `method` label takes these; any other token a client sends is "other", so clients cannot mint series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})


class Metrics:
    """The server's metrics for one served model; `render()` is the /metrics body."""

    def __init__(self, model_name: str, ready: EngineReady, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry(auto_describe=True)
        r, name = self.registry, ["model_name"]

        def histogram(metric: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(metric, doc, name, buckets=buckets, registry=r).labels(model_name)

        def counter(metric: str, doc: str) -> Counter:
            return Counter(metric, doc, name, registry=r).labels(model_name)

        self.ttft = histogram("llamaserve_time_to_first_token_seconds",
                              "Time from the server receiving a request to its first token being sampled.",
                              TTFT_BUCKETS)
        self.itl = histogram("llamaserve_inter_token_latency_seconds",
                             "Time between two consecutive tokens of a request (one observation per gap).",
                             ITL_BUCKETS)
        self.e2e = histogram("llamaserve_e2e_request_latency_seconds",
                             "Time from the server receiving a request to its last token.", REQUEST_TIME_BUCKETS)
        self.queue = histogram("llamaserve_request_queue_time_seconds",
                               "Time a request waited in the engine before its first step.", REQUEST_TIME_BUCKETS)
        self.prefill = histogram("llamaserve_request_prefill_time_seconds",
                                 "Time from a request's first step to its first token.", REQUEST_TIME_BUCKETS)
        self.decode = histogram("llamaserve_request_decode_time_seconds",
                                "Time from a request's first token to its last.", REQUEST_TIME_BUCKETS)
        self.request_prompt_tokens = histogram("llamaserve_request_prompt_tokens",
                                               "Prompt tokens of a finished request.", TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("llamaserve_request_generation_tokens",
                                                   "Tokens generated for a finished request.", TOKEN_COUNT_BUCKETS)
        self.prompt_tokens = counter("llamaserve_prompt_tokens",
                                     "Prompt tokens of requests whose prefill completed (prefix-cached ones included).")
        self.generation_tokens = counter("llamaserve_generation_tokens", "Tokens generated and handed to clients.")

        success = Counter("llamaserve_request_success", "Requests finished, by finish reason.",
                          ["model_name", "finished_reason"], registry=r)
        self.finished = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        rejected = Counter("llamaserve_requests_rejected", "Requests refused before generation, by reason.",
                           ["model_name", "reason"], registry=r)
        self.rejected = {reason: rejected.labels(model_name, reason) for reason in REJECTION_REASONS}

        labels = ["model_name", "method", "route", "status"]
        self._http_requests = Counter("llamaserve_http_requests", "HTTP requests by route and status.", labels,
                                      registry=r)
        self._http_duration = Histogram("llamaserve_http_request_duration_seconds",
                                        "HTTP request handling time, until the last byte of the response.",
                                        labels, buckets=HTTP_TIME_BUCKETS, registry=r)
        self.model_name = model_name
        r.register(EngineCollector(model_name, ready, stats))

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (self.model_name, method if method in HTTP_METHODS else "other", route, str(status))
        self._http_requests.labels(*labels).inc()
        self._http_duration.labels(*labels).observe(seconds)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class RequestMetrics:
    """One engine request's latency and token metrics, fed its outputs as they arrive.

    `start` is when the server received the HTTP request (time.monotonic(), the clock of the engine's
    stamps): TTFT and e2e latency are what the client waits, tokenization included. The per-request
    histograms describe requests that completed (stop or length); aborted and failed ones are counted
    by finish reason only, as their latencies would say more about the client than the server.
    """

    def __init__(self, metrics: Metrics, start: float, num_prompt_tokens: int):
        self.metrics = metrics
        self.start = start
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.arrival_time: float | None = None  # entered the engine's queue
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.finish_reason: str | None = None

    def output(self, out: RequestOutput) -> None:
        self.arrival_time = out.arrival_time
        self.first_scheduled_time = out.first_scheduled_time
        self.num_cached_tokens = out.num_cached_tokens
        if not out.new_token_ids:
            return
        m = self.metrics
        if self.first_token_time is None and out.first_token_time is not None:
            self.first_token_time = out.first_token_time
            m.ttft.observe(out.first_token_time - self.start)
            m.prompt_tokens.inc(self.num_prompt_tokens)  # the prefill is done
        if out.token_time is not None:
            if self.last_token_time is not None:
                m.itl.observe(out.token_time - self.last_token_time)
            self.last_token_time = out.token_time
        self.num_output_tokens += len(out.new_token_ids)
        m.generation_tokens.inc(len(out.new_token_ids))
        # A stop string ends a request in the API, with no engine finish time: its last token's time then.
        self.finished_time = out.finished_time or out.token_time

    def finish(self, reason: str) -> None:
        """Counts the request as finished for `reason`; later calls do nothing."""
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        m = self.metrics
        m.finished[reason].inc()
        if reason not in ("stop", "length") or None in (self.first_token_time, self.finished_time):
            return
        m.e2e.observe(self.finished_time - self.start)
        if self.arrival_time is not None and self.first_scheduled_time is not None:
            m.queue.observe(self.first_scheduled_time - self.arrival_time)
            m.prefill.observe(self.first_token_time - self.first_scheduled_time)
        m.decode.observe(self.finished_time - self.first_token_time)
        m.request_prompt_tokens.observe(self.num_prompt_tokens)
        m.request_generation_tokens.observe(self.num_output_tokens)


def rejection_reason(error: APIError) -> str | None:
    """The llamaserve_requests_rejected_total reason of an error answered before generation; None for
    errors that are not a refusal (a client gone, a server fault)."""
    if error.status in (401, 403):
        return "unauthorized"
    if error.code == "server_shutting_down":
        return "draining"
    if error.status in (429, 503):  # the server cannot take requests now (at its limit, engine down)
        return "overloaded"
    if error.code == "context_length_exceeded":
        return "too_long"
    if 400 <= error.status < 499:
        return "validation"
    return None


class EngineCollector(Collector):
    """The engine's load, counters and step histogram, read from its latest EngineStats at scrape time."""

    def __init__(self, model_name: str, ready: EngineReady, stats: Callable[[], EngineStats]):
        self.model_name = model_name
        self.stats = stats
        self.info = {"version": version("llamaserve"), "dtype": ready.dtype, "block_size": str(ready.block_size),
                     "num_kv_blocks": str(ready.num_kv_blocks), "max_model_len": str(ready.max_model_len),
                     "tensor_parallel_size": str(ready.tensor_parallel_size)}

    def collect(self) -> Iterator:
        s, name = self.stats(), [self.model_name]

        def family(kind, metric: str, doc: str, value: float):
            f = kind(metric, doc, labels=["model_name"])
            f.add_metric(name, value)
            return f

        yield family(GaugeMetricFamily, "llamaserve_num_requests_running", "Requests in the engine's running batch.",
                     s.num_running)
        yield family(GaugeMetricFamily, "llamaserve_num_requests_waiting",
                     "Requests waiting for admission (new or preempted).", s.num_waiting)
        yield family(GaugeMetricFamily, "llamaserve_kv_cache_usage_ratio",
                     "Fraction of KV cache blocks held by requests (0-1).", s.kv_cache_usage)
        yield family(CounterMetricFamily, "llamaserve_preemptions", "Requests preempted for lack of KV blocks.",
                     s.preemptions)
        yield family(CounterMetricFamily, "llamaserve_prefix_cache_queries",
                     "Prompt tokens looked up in the prefix cache.", s.prefix_queried_tokens)
        yield family(CounterMetricFamily, "llamaserve_prefix_cache_hits",
                     "Prompt tokens found in the prefix cache.", s.prefix_hit_tokens)

        steps = HistogramMetricFamily("llamaserve_iteration_tokens", "Tokens computed per engine step.",
                                      labels=["model_name"])
        cumulative, buckets = 0, []
        for bound, count in zip([*ITERATION_TOKENS_BUCKETS, float("inf")], s.iteration_tokens_counts):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else str(float(bound)), cumulative))
        steps.add_metric(name, buckets, sum_value=s.computed_tokens)
        yield steps

        info = InfoMetricFamily("llamaserve_engine", "The engine's configuration.", labels=["model_name"])
        info.add_metric(name, self.info)
        yield info
