"""Graceful drain of a real server process: SIGTERM, Ctrl+C to the process group, a second signal, the
drain's deadline; and the stream keep-alives and send timeout that keep proxies and stuck clients from
holding a stream wrong."""

import json
import os
import signal
import socket
import threading
import time

import httpx
import openai
import psutil
import pytest

from tests.e2e.checks import assert_error_shape, spawned_children
from tests.e2e.conftest import Server

QUESTION = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
LONG = 1000  # tokens: seconds of decoding on the tiny model, whose steps cost almost nothing


class Stream(threading.Thread):
    """A chat stream read to its end in a thread: its events (JSON payloads, "[DONE]" as the string)."""

    def __init__(self, url: str, max_tokens: int, **fields):
        super().__init__(daemon=True)
        self.url, self.body = url, {"messages": QUESTION, "max_tokens": max_tokens, "ignore_eos": True,
                                    "stream": True, "temperature": 0, **fields}
        self.events: list = []
        self.started = threading.Event()  # the first token arrived
        self.mark = 0  # how many events had come when `mark_now()` was called
        self.error: Exception | None = None
        self.start()

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=self.body, timeout=120) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        payload = line.removeprefix("data: ")
                        self.events.append(payload if payload == "[DONE]" else json.loads(payload))
                        self.started.set()
        except Exception as e:  # the test asserts on it
            self.error = e
        finally:
            self.started.set()

    def mark_now(self) -> None:
        self.mark = len(self.events)

    def result(self, timeout: float = 120) -> list:
        self.join(timeout)
        assert not self.is_alive(), "the stream hangs"
        assert self.error is None, repr(self.error)
        assert self.events and self.events[-1] == "[DONE]", self.events[-3:]
        return self.events[:-1]


def finish_reasons(events: list) -> list:
    return [c["finish_reason"] for e in events for c in e.get("choices", []) if c["finish_reason"]]


def error_codes(events: list) -> list:
    return [e["error"]["code"] for e in events if "error" in e]


def ask(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})


def test_sigterm_turns_ready_off_serves_through_the_grace_then_refuses_and_lets_streams_finish(tmp_path,
                                                                                                tiny_model):
    server = Server(tmp_path, "--model", str(tiny_model), "--drain-grace", "2", "--drain-timeout", "120")
    try:
        streams = [Stream(server.url, LONG) for _ in range(4)]
        assert all(s.started.wait(60) for s in streams)
        server.process.send_signal(signal.SIGTERM)
        for stream in streams:
            stream.mark_now()
        signalled = time.monotonic()
        assert_error_shape(httpx.get(f"{server.url}/ready", timeout=5), 503)
        assert time.monotonic() - signalled < 1
        assert ask(server.url).status_code == 200  # in the grace: still served
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200  # liveness holds throughout

        time.sleep(max(0.0, signalled + 2.5 - time.monotonic()))
        refused = ask(server.url)
        error = assert_error_shape(refused, 503)
        assert error["code"] == "server_shutting_down" and refused.headers["retry-after"]
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        assert 'reason="draining"' in httpx.get(f"{server.url}/metrics", timeout=5).text

        for stream in streams:  # in flight when the signal came: they run to their end
            events = stream.result()
            assert finish_reasons(events) == ["length"] and not error_codes(events)
            assert len(events) > stream.mark
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def test_ctrl_c_to_the_process_group_drains_instead_of_killing_the_engine(tmp_path, tiny_model):
    """A terminal's Ctrl+C (or systemd stopping a unit) signals every process of the group: the engine
    must not die of it, or every stream would end with engine_dead."""
    server = Server(tmp_path, "--model", str(tiny_model), "--drain-grace", "0", "--drain-timeout", "120",
                    new_session=True)
    try:
        [engine] = spawned_children(psutil.Process(server.process.pid))
        streams = [Stream(server.url, LONG) for _ in range(3)]
        assert all(s.started.wait(60) for s in streams)
        os.killpg(server.process.pid, signal.SIGINT)
        for stream in streams:
            stream.mark_now()
        for stream in streams:
            events = stream.result()
            assert finish_reasons(events) == ["length"] and not error_codes(events)
            assert len(events) > stream.mark  # tokens kept coming after the signal
        assert server.process.wait(timeout=30) == 0
        engine.wait(timeout=10)  # stopped by the API process once the drain was over
    finally:
        server.stop()


def test_a_second_signal_cuts_what_is_left_with_an_error(tmp_path, tiny_model):
    server = Server(tmp_path, "--model", str(tiny_model), "--drain-grace", "30", "--drain-timeout", "60")
    try:
        long = Stream(server.url, LONG)
        assert long.started.wait(60)
        whole = {}
        asking = threading.Thread(target=lambda: whole.setdefault("response", httpx.post(
            f"{server.url}/v1/chat/completions", timeout=60,
            json={"messages": QUESTION, "max_tokens": LONG, "ignore_eos": True})))
        asking.start()
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert not long.events or long.events[-1] != "[DONE]"  # still streaming: the grace is 30 s
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGINT)  # ends the drain now: skips the grace and the timeout

        events = long.result(timeout=30)
        assert error_codes(events) == ["server_shutting_down"] and not finish_reasons(events)
        asking.join(30)
        assert assert_error_shape(whole["response"], 503)["code"] == "server_shutting_down"
        assert server.process.wait(timeout=30) == 0
        print(f"cut and stopped {time.monotonic() - signalled:.1f} s after the second signal")
        assert time.monotonic() - signalled < 10
    finally:
        server.stop()


def test_a_stream_waiting_in_the_queue_gets_keep_alive_comments(tmp_path, tiny_model):
    server = Server(tmp_path, "--model", str(tiny_model), "--max-num-seqs", "1", "--sse-ping-interval", "0.3")
    try:
        ahead = Stream(server.url, LONG)  # holds the only running slot for a few seconds
        assert ahead.started.wait(60)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,  # no role chunk before the tokens
                          json={"prompt": "Once upon a time", "max_tokens": 4, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line]
        first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
        assert lines[:first_data] and set(lines[:first_data]) == {": ping"}, lines[:first_data + 1]
        assert lines[-1] == "data: [DONE]"
        # the official SDK reads a stream with comments in it
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=client.models.list().data[0].id, messages=QUESTION, max_tokens=8, stream=True) if c.choices)
        assert text
        ahead.result()
    finally:
        server.stop()


def test_a_client_that_stops_reading_is_cut_after_the_send_timeout_and_frees_its_slots(tmp_path, tiny_model):
    n = 32
    server = Server(tmp_path, "--model", str(tiny_model), "--sse-send-timeout", "1", "--max-concurrent-requests",
                    str(n), "--max-num-seqs", str(n))
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that takes nothing in
        sock.connect(("127.0.0.1", server.port))
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1900, "ignore_eos": True, "n": n,
                           "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        while "client read nothing" not in server.log_path.read_text():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        while (health := httpx.get(f"{server.url}/health", timeout=5).json())["num_running"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.2)
        # every slot is free again: a request as wide as the limit is admitted
        wide = httpx.post(f"{server.url}/v1/completions", timeout=60, json={"prompt": "Hi", "max_tokens": 1, "n": n})
        assert wide.status_code == 200, wide.text
        sock.close()
    finally:
        server.stop()


@pytest.mark.parametrize("flag", ["--drain-grace", "--drain-timeout", "--sse-ping-interval"])
def test_negative_drain_and_stream_settings_are_refused_at_start(flag):
    from llamaserve.config import load_config

    with pytest.raises(ValueError, match=flag.removeprefix("--").replace("-", "_")):
        load_config(None, **{flag.removeprefix("--").replace("-", "_"): -1})
