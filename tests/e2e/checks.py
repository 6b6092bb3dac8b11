"""Strict readers of what the server sends (SSE framing, the error shape), and killing a server's
processes under a live stream."""

import json
import time

import httpx
import psutil


def read_events(response: httpx.Response) -> list:
    """The events' payloads, JSON-decoded, with "[DONE]" kept as the string; asserts the framing.
    Keep-alive comments (`: ping`) are skipped."""
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.read().decode()
    assert body.endswith("\n\n") and "\r" not in body, repr(body[-200:])
    events = []
    for event in body[:-2].split("\n\n"):
        if event == ": ping":
            continue
        assert event.startswith("data: ") and "\n" not in event, repr(event)
        payload = event.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events


def assert_error_shape(response: httpx.Response, status: int, param: str | None = None) -> dict:
    """The response is `status` with OpenAI's error object, naming `param`; returns the error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    assert body["error"]["param"] == param
    return body["error"]


def spawned_children(process: psutil.Process) -> list[psutil.Process]:
    """The processes `process` started with multiprocessing (the server's engine; the engine's workers)."""
    return [p for p in process.children() if "spawn_main" in " ".join(p.cmdline())]


def kill_under_stream(http: httpx.Client, victim: psutil.Process) -> tuple[list[str], float]:
    """Start a long streaming chat and kill `victim` once tokens flow. Returns the events that came
    after (raw payloads) and the seconds the stream took to end after the kill."""
    body = {"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 1000,
            "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        while '"delta":{"content"' not in next(lines):  # the stream is under way
            pass
        victim.kill()
        killed = time.monotonic()
        events = [line.removeprefix("data: ") for line in lines if line]
        return events, time.monotonic() - killed


def assert_ends_engine_dead(events: list[str]) -> None:
    """A stream cut by a dead engine ends with one engine_dead error event, then [DONE]."""
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_dead" and error["type"] == "server_error"
    assert all("error" not in json.loads(e) for e in events[:-2])
