"""Faults stay small: a fault in one request fails that request, a fault in a step fails the step's
requests, a wedged engine is reported, and a deadline stops a request. The engine serves on after
each, and the others' greedy text is exactly what it is alone. Faults are injected by the hidden
`--inject-fault KIND:TOKEN_ID` flag: a request whose prompt holds TOKEN_ID trips them."""

import asyncio
import json
import time

import httpx
import pytest

from tests.e2e.checks import assert_error_shape
from tests.e2e.conftest import Server

MARK = 30000  # the marker token: in no prompt below but the marked one
PROMPTS = ["Name a color.", "What is 2 + 2?", "Say hello in French.", "Name a planet.", "Count to five.",
           "What is the capital of Italy?", "Name a fruit."]
GREEDY = {"temperature": 0, "max_tokens": 64, "ignore_eos": True}


def chat(prompt: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], **GREEDY, **fields}


def marked_request(http: httpx.Client) -> dict:
    ids = http.post("/tokenize", json={"prompt": "Tell me about the sea."}).json()["tokens"]
    return {"prompt": ids + [MARK], **GREEDY}


def solo_texts(http: httpx.Client) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        assert MARK not in http.post("/tokenize", json={"messages": chat(prompt)["messages"]}).json()["tokens"]
        texts.append(http.post("/v1/chat/completions", json=chat(prompt)).json()["choices"][0]["message"]["content"])
    return texts


async def stream_text(http: httpx.AsyncClient, body: dict, started: asyncio.Event) -> tuple[str, dict | None]:
    """A streaming chat's text, and the error event it ended with (None if it finished normally)."""
    text, error = "", None
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                error = event["error"]
            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                text += event["choices"][0]["delta"]["content"]
                started.set()
    return text, error


async def streams_then_marked(url: str, marked: dict) -> tuple[list[tuple[str, dict | None]], httpx.Response]:
    """Seven greedy streams, each under way before the next starts, then the marked request beside them."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        tasks = []
        for prompt in PROMPTS:
            started = asyncio.Event()
            tasks.append(asyncio.create_task(stream_text(http, chat(prompt), started)))
            await asyncio.wait_for(started.wait(), timeout=30)
        response = await http.post("/v1/completions", json=marked)
        return await asyncio.gather(*tasks), response


def only_the_request_failed(results: list[tuple[str, dict | None]], solo: list[str], error: dict) -> None:
    assert "injected fault" in error["message"]
    assert [text for text, _ in results] == solo and all(e is None for _, e in results)


def the_step_failed(results: list[tuple[str, dict | None]], solo: list[str], error: dict) -> None:
    # Every stream was in the marked request's first step: each ends with an error event, after a
    # correct beginning of its text.
    for (text, stream_error), alone in zip(results, solo):
        assert stream_error["code"] == "engine_error" and "OutOfMemoryError" in stream_error["message"]
        assert alone.startswith(text) and text != alone


@pytest.mark.parametrize("kind,check", [("request", only_the_request_failed), ("step", the_step_failed)])
def test_an_injected_fault_fails_what_it_concerns_and_the_engine_serves_on(tmp_path, kind, check):
    server = Server(tmp_path, "--inject-fault", f"{kind}:{MARK}")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        solo = solo_texts(http)
        results, marked = asyncio.run(streams_then_marked(server.url, marked_request(http)))
        error = assert_error_shape(marked, 500)
        assert error["code"] == "engine_error"
        check(results, solo, error)
        assert http.get("/health").json()["kv_cache_usage"] == 0
        again = http.post("/v1/chat/completions", json=chat(PROMPTS[0])).json()["choices"][0]["message"]["content"]
        assert again == solo[0]
    finally:
        server.stop()


def test_a_wedged_engine_turns_health_503_and_its_requests_fail(tmp_path):
    server = Server(tmp_path, "--inject-fault", f"hang:{MARK}", "--engine-stall-timeout", "2")
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        assert http.get("/health").status_code == 200
        # a first step may be slow (cold caches, a busy machine): warm up before a 2 s watchdog counts
        assert http.post("/v1/chat/completions", json=chat(PROMPTS[1], max_tokens=2)).status_code == 200
        marked = marked_request(http)

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as ahttp:
                started = asyncio.Event()
                running = asyncio.create_task(stream_text(ahttp, chat(PROMPTS[0], max_tokens=1000), started))
                await asyncio.wait_for(started.wait(), timeout=30)
                hung = time.monotonic()
                response = await ahttp.post("/v1/completions", json=marked)
                return await running, response, time.monotonic() - hung

        (text, error), response, waited = asyncio.run(main())
        assert text and error["code"] == "engine_stalled"
        assert assert_error_shape(response, 503)["code"] == "engine_stalled"
        assert 2 <= waited < 10
        assert assert_error_shape(http.get("/health"), 503)["code"] == "engine_stalled"
        refused = http.post("/v1/chat/completions", json=chat(PROMPTS[1]))
        assert assert_error_shape(refused, 503)["code"] == "engine_stalled"
    finally:
        server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_deadline_is_stopped_and_its_kv_freed(http, stream):
    body = chat("Tell me a long story.", max_tokens=2000, stream=stream)
    start = time.monotonic()
    response = http.post("/v1/chat/completions", json=body, headers={"x-request-timeout": "1"})
    elapsed = time.monotonic() - start
    if stream:
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
    else:
        error = assert_error_shape(response, 408)
    assert error["code"] == "request_timeout"
    assert 1 <= elapsed < 3
    deadline = time.monotonic() + 5
    while http.get("/health").json()["kv_cache_usage"] != 0:
        assert time.monotonic() < deadline, "the timed-out request still holds KV blocks"
        time.sleep(0.05)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf"])
def test_a_bad_deadline_header_is_a_400(http, value):
    response = http.post("/v1/chat/completions", json=chat("Hi", max_tokens=1), headers={"x-request-timeout": value})
    assert_error_shape(response, 400, "x-request-timeout")
