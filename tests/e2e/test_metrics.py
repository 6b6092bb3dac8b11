"""GET /metrics on the shared live server: counts that must match what the requests did, exactly.

The server is shared by the whole session, so every check compares a scrape before with one after.
"""

import asyncio
import contextlib
import json

import httpx
import pytest

from tests.e2e.scrape import idle, scrape, wait_for

PROMPTS = ["Name a color.", "What is the tallest mountain on Earth?", "Say hello.",
           "List three fruits that are red, and say why they are red."]
N, M = len(PROMPTS), 6


async def stream_chat(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    """Streams one chat completion to its end; returns its usage."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    usage = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    return usage


def test_streamed_requests_are_counted_exactly(server, http):
    before = wait_for(http, idle)

    async def all_at_once() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(stream_chat(client, p, M) for p in PROMPTS))

    usages = asyncio.run(all_at_once())
    after = wait_for(http, idle)
    diff = lambda name, **labels: after.value(name, **labels) - before.value(name, **labels)  # noqa: E731

    assert [u["completion_tokens"] for u in usages] == [M] * N
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    assert diff("llamaserve_time_to_first_token_seconds_count") == N
    assert diff("llamaserve_e2e_request_latency_seconds_count") == N
    assert diff("llamaserve_inter_token_latency_seconds_count") == N * (M - 1)
    for stage in ("queue", "prefill", "decode"):
        assert diff(f"llamaserve_request_{stage}_time_seconds_count") == N
    assert diff("llamaserve_generation_tokens_total") == N * M
    assert diff("llamaserve_prompt_tokens_total") == prompt_tokens
    assert diff("llamaserve_request_generation_tokens_sum") == N * M
    assert diff("llamaserve_request_prompt_tokens_sum") == prompt_tokens
    assert diff("llamaserve_request_success_total", finished_reason="length") == N
    assert diff("llamaserve_request_success_total") == N
    # Engine-side: every prompt looked up once in the prefix cache, and the steps computed each prompt's
    # uncached tokens plus one token per decode (the last sampled token is never fed back).
    assert diff("llamaserve_preemptions_total") == 0
    assert diff("llamaserve_prefix_cache_queries_total") == prompt_tokens
    hits = diff("llamaserve_prefix_cache_hits_total")
    assert diff("llamaserve_iteration_tokens_sum") == prompt_tokens - hits + N * (M - 1)
    assert M <= diff("llamaserve_iteration_tokens_count") <= N * M
    # Latencies are positive and ordered: each request's first token came before its last.
    assert 0 < diff("llamaserve_time_to_first_token_seconds_sum") < diff("llamaserve_e2e_request_latency_seconds_sum")
    assert after.value("llamaserve_kv_cache_usage_ratio") == 0
    posts = {"route": "/v1/chat/completions", "status": "200"}  # counted once each stream has ended
    wait_for(http, lambda s: s.get("llamaserve_http_requests_total", **posts)
             >= before.get("llamaserve_http_requests_total", **posts) + N)


def test_gauges_return_to_zero_after_aborts(server, http):
    before = wait_for(http, idle)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1000,
            "ignore_eos": True, "stream": True}
    with contextlib.ExitStack() as streams:
        readers = []  # held: a line iterator that is garbage-collected closes its stream
        for _ in range(3):
            client = streams.enter_context(httpx.Client(base_url=server.url, timeout=60))
            readers.append(streams.enter_context(client.stream("POST", "/v1/chat/completions", json=body)).iter_lines())
            while '"delta":{"content"' not in next(readers[-1]):  # this request is running
                pass
        busy = scrape(http)
        assert busy.value("llamaserve_num_requests_running") == 3
        assert busy.value("llamaserve_kv_cache_usage_ratio") > 0
    after = wait_for(http, idle, timeout=5)  # the clients left: their requests were aborted
    assert after.value("llamaserve_kv_cache_usage_ratio") == 0
    diff = lambda name, **labels: after.value(name, **labels) - before.value(name, **labels)  # noqa: E731
    assert diff("llamaserve_request_success_total", finished_reason="abort") == 3
    assert diff("llamaserve_time_to_first_token_seconds_count") == 3
    assert diff("llamaserve_e2e_request_latency_seconds_count") == 0  # latencies describe completed requests


@pytest.mark.parametrize("body, reason", [
    ({"messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}, "validation"),
    ({"messages": [{"role": "user", "content": "Hi"}], "model": "gpt-4"}, "validation"),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000}, "too_long"),
    ({"prompt": "word " * 3000}, "too_long"),
])
def test_a_rejected_request_counts_its_reason(http, body, reason):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    before = scrape(http)
    response = http.post(path, json=body)
    assert response.status_code in (400, 404)
    after = scrape(http)
    for r in ("validation", "overloaded", "too_long", "unauthorized"):
        change = after.value("llamaserve_requests_rejected_total", reason=r) - \
            before.value("llamaserve_requests_rejected_total", reason=r)
        assert change == (1 if r == reason else 0), r
    assert after.value("llamaserve_request_success_total") == before.value("llamaserve_request_success_total")


def test_every_series_names_the_model_and_the_engine_is_described(http, model):
    s = scrape(http)
    assert all(sample.labels.get("model_name") == model for sample in s.samples)
    [info] = [x for x in s.samples if x.name == "llamaserve_engine_info"]
    assert info.value == 1
    assert info.labels["dtype"] == "float32" and info.labels["block_size"] == "16"
    assert info.labels["tensor_parallel_size"] == "1" and info.labels["max_model_len"] == "2048"
    assert int(info.labels["num_kv_blocks"]) > 0 and info.labels["version"]
    for reason in ("stop", "length", "abort", "error"):  # present from the start, so rate() sees the first one
        s.value("llamaserve_request_success_total", finished_reason=reason)


def test_http_requests_are_counted_by_route_and_status(http):
    def count(s, **labels) -> float:
        return s.get("llamaserve_http_requests_total", **labels)

    before = scrape(http)
    assert http.get("/v1/models").status_code == 200
    assert http.get("/v1/no-such-route").status_code == 404
    # Counted once the response is sent, so possibly just after the client has it.
    after = wait_for(http, lambda s: count(s, route="unmatched", status="404") == count(
        before, route="unmatched", status="404") + 1 and count(s, route="/v1/models") == count(
        before, route="/v1/models") + 1)
    assert count(after, route="/v1/models", method="GET", status="200") == count(
        before, route="/v1/models", method="GET", status="200") + 1
    assert after.get("llamaserve_http_request_duration_seconds_count", route="/v1/models") == count(
        after, route="/v1/models")


def test_unknown_http_methods_share_one_label(http):
    """A client sending made-up methods cannot mint new series: they all count as method "other"."""
    def other(s) -> float:
        return s.get("llamaserve_http_requests_total", method="other")

    before = scrape(http)
    for method in ("BREW", "PROPFIND", "X" * 200):
        assert http.request(method, "/health").status_code == 405
    after = wait_for(http, lambda s: other(s) == other(before) + 3)
    assert {s.labels.get("method") for s in after.samples if "method" in s.labels} <= {
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other"}
    assert after.get("llamaserve_http_requests_total", method="other", route="/health", status="405") >= 3


def test_request_ids_are_echoed_or_made(http):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    assert http.post("/v1/chat/completions", json=body, headers={"x-request-id": "lb-42"}).headers["x-request-id"] \
        == "lb-42"
    made = {http.post("/v1/chat/completions", json=body).headers["x-request-id"] for _ in range(2)}
    assert len(made) == 2 and all(len(i) == 32 for i in made)
    refused = http.post("/v1/chat/completions", json={"messages": []}, headers={"x-request-id": "bad-1"})
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "bad-1"
    assert "traceparent" not in refused.headers  # tracing is off on this server
    unprintable = http.get("/v1/models", headers={"x-request-id": "a\tb"}).headers["x-request-id"]
    assert unprintable != "a\tb" and len(unprintable) == 32
