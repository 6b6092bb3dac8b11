"""Strict readers of what the server sends: SSE framing and the error shape."""

import json

import httpx


def read_events(response: httpx.Response) -> list:
    """The events' payloads, JSON-decoded, with "[DONE]" kept as the string; asserts the framing."""
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.read().decode()
    assert body.endswith("\n\n") and "\r" not in body, repr(body[-200:])
    events = []
    for event in body[:-2].split("\n\n"):
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
