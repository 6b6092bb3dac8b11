"""A server of its own: chat-template errors, then the engine process killed under a live stream."""

import httpx
import psutil

from tests.e2e.checks import assert_ends_engine_dead, assert_error_shape, kill_under_stream, spawned_children
from tests.e2e.conftest import Server


def test_template_error_then_engine_death_ends_the_server(tmp_path):
    server = Server(tmp_path, "--chat-template", "llama-2")  # a template that checks role order
    try:
        http = httpx.Client(base_url=server.url, timeout=60)
        wrong_order = [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]
        error = assert_error_shape(http.post("/v1/chat/completions", json={"messages": wrong_order}), 400, "messages")
        assert "roles must alternate" in error["message"]

        [engine] = spawned_children(psutil.Process(server.process.pid))
        events, _ = kill_under_stream(http, engine)
        assert_ends_engine_dead(events)

        try:  # the server may already have closed its socket
            assert_error_shape(http.get("/health"), 503)
        except httpx.TransportError:
            pass
        assert server.process.wait(timeout=30) != 0  # it shut itself down, reporting failure
    finally:
        server.stop()
