"""`llamaserve serve --tensor-parallel-size 3` on the default model: the same answers as one rank, and a
killed worker fails the pending stream at once and takes the server down with a non-zero exit."""

import json
import time

import httpx
import openai
import psutil

from tests.e2e.checks import assert_error_shape
from tests.e2e.conftest import Server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_three_ranks_serve_like_one_and_a_dead_worker_ends_the_server(tmp_path, client, model):
    server = Server(tmp_path, "--tensor-parallel-size", "3")
    try:
        split = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        answer = split.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
        single = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
        assert answer.choices[0].message.content == single.choices[0].message.content
        assert "Paris" in answer.choices[0].message.content

        [engine] = [p for p in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(p.cmdline())]
        workers = [p for p in engine.children() if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        http = httpx.Client(base_url=server.url, timeout=60)
        body = {"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 1000,
                "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            while '"delta":{"content"' not in next(lines):  # the stream is under way
                pass
            workers[1].kill()
            killed = time.monotonic()
            events = [line.removeprefix("data: ") for line in lines if line]
            failed_after = time.monotonic() - killed
        print(f"stream failed {failed_after:.2f} s after the worker was killed")
        assert failed_after < 5
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_dead" and error["type"] == "server_error"
        try:  # the server may already have closed its socket
            assert_error_shape(http.get("/health"), 503)
        except httpx.TransportError:
            pass
        assert server.process.wait(timeout=30) != 0
        _, alive = psutil.wait_procs([engine, *workers], timeout=5)  # the surviving worker follows its engine
        assert not alive, [p.cmdline() for p in alive]
    finally:
        server.stop()
