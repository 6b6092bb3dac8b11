"""`llamaserve serve --tensor-parallel-size 3` on the default model: the same answers as one rank, and a
killed worker fails the pending stream at once and takes the server down with a non-zero exit."""

import httpx
import openai
import psutil

from tests.e2e.checks import assert_ends_engine_dead, assert_error_shape, kill_under_stream, spawned_children
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

        [engine] = spawned_children(psutil.Process(server.process.pid))
        workers = spawned_children(engine)
        assert len(workers) == 2
        http = httpx.Client(base_url=server.url, timeout=60)
        events, failed_after = kill_under_stream(http, workers[1])
        print(f"stream failed {failed_after:.2f} s after the worker was killed")
        assert failed_after < 5
        assert_ends_engine_dead(events)
        try:  # the server may already have closed its socket
            assert_error_shape(http.get("/health"), 503)
        except httpx.TransportError:
            pass
        assert server.process.wait(timeout=30) != 0
        _, alive = psutil.wait_procs([engine, *workers], timeout=5)  # the surviving worker follows its engine
        assert not alive, [p.cmdline() for p in alive]
    finally:
        server.stop()
