"""A server of its own: chat-template errors, then the engine process killed under a live stream."""

import json

import httpx
import psutil

from tests.e2e.checks import assert_error_shape
from tests.e2e.conftest import Server


def test_template_error_then_engine_death_ends_the_server(tmp_path):
    server = Server(tmp_path, "--chat-template", "llama-2")  # a template that checks role order
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        wrong_order = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]
        error = assert_error_shape(http.post("/v1/chat/completions", json={"messages": wrong_order}), 400, "messages")
        assert "roles must alternate" in error["message"]

        [engine] = [p for p in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        body = {"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 1000,
                "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            while '"delta":{"content"' not in next(lines):  # the stream is under way
                pass
            engine.kill()
            events = [line.removeprefix("data: ") for line in lines if line]
        # The stream ends with one error event, then [DONE].
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_dead" and error["type"] == "server_error"
        assert all("error" not in json.loads(e) for e in events[:-2])

        try:  # the server may already have closed its socket
            assert_error_shape(http.get("/health"), 503)
        except httpx.TransportError:
            pass
        assert server.process.wait(timeout=30) != 0  # it shut itself down, reporting failure
    finally:
        server.stop()
