"""A server at its concurrency limit refuses more work with 429 and Retry-After, and serves again once
a slot frees: an overloaded server says so instead of queueing without bound."""

import contextlib

import httpx
import openai
import pytest

from tests.e2e.checks import assert_error_shape
from tests.e2e.conftest import Server
from tests.e2e.scrape import idle, scrape, wait_for

LONG = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1000,
        "ignore_eos": True, "stream": True}
SHORT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}


def test_requests_beyond_the_limit_get_429_with_retry_after(tmp_path):
    server = Server(tmp_path, "--max-concurrent-requests", "2")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        with contextlib.ExitStack() as streams:
            readers = []  # held: a line iterator that is garbage-collected closes its stream
            for _ in range(2):  # fill both slots with streams that are under way
                readers.append(streams.enter_context(http.stream("POST", "/v1/chat/completions", json=LONG))
                               .iter_lines())
                while '"delta":{"content"' not in next(readers[-1]):
                    pass
            refused = http.post("/v1/chat/completions", json=SHORT)
            error = assert_error_shape(refused, 429)
            assert error["code"] == "overloaded" and error["type"] == "server_error"
            assert refused.headers["retry-after"] == "1"
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
            too_many = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "n": 3})
            assert_error_shape(too_many, 400, "n")  # more choices than the limit: retrying cannot help
        wait_for(http, idle)  # the streams are closed and aborted: their slots are free again
        assert http.post("/v1/chat/completions", json=SHORT).status_code == 200
        metrics = scrape(http)
        assert metrics.value("llamaserve_requests_rejected_total", reason="overloaded") == 2
        assert metrics.value("llamaserve_requests_rejected_total", reason="validation") == 1
    finally:
        server.stop()
