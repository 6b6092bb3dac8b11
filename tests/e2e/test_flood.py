"""Floods: a burst of long prompts does not freeze the API, neither side of the engine channel can block
the other (each process stopped in turn while the other floods it), and admission is exact under a burst."""

import asyncio
import os
import random
import signal
import statistics
import threading
import time

import httpx
import psutil

from tests.e2e.checks import assert_error_shape, spawned_children
from tests.e2e.conftest import Server
from tests.e2e.test_concurrency import wait_until_idle

WORDS = ["river", "stone", "lamp", "orbit", "violet", "copper", "harbor", "meadow", "signal", "thread"]


def long_prompt(i: int, words: int) -> str:
    rng = random.Random(i)  # distinct, so the prefix cache cannot serve them
    return f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def probe(url: str, stop: threading.Event, latencies: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            start = time.perf_counter()
            assert http.get("/health").status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)


def test_health_answers_promptly_while_a_burst_of_long_prompts_arrives(server, http):
    """The event loop never waits on the engine: bench/probe_latency.py measures this at full size."""
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(server.url, stop, latencies))
    prober.start()

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ahttp:
            tasks = [asyncio.create_task(ahttp.post("/v1/completions", json={"prompt": long_prompt(i, 1500),
                                                                             "max_tokens": 1}))
                     for i in range(32)]
            await asyncio.wait(tasks, timeout=8)  # the hand-over and some prefill; the rest is cancelled
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    try:
        asyncio.run(burst())
    finally:
        stop.set()
        prober.join()
    wait_until_idle(http, timeout=30)
    worst = max(latencies)
    print(f"{len(latencies)} probes: p50 {statistics.median(latencies) * 1000:.1f} ms, worst {worst * 1000:.1f} ms")
    # Far above the benchmark's goal (100 ms), to stay clear of a noisy machine; an event loop that blocks
    # on the engine's pipe waited up to 2.5 s here.
    assert worst < 1.0


def test_neither_side_of_the_engine_channel_can_block_the_other(tmp_path, tiny_model):
    """The engine process stopped while long prompts pour in: the API still answers at once. Then the
    API process stopped while the engine's outputs pile up, and long prompts wait to pour in the
    moment it resumes: nothing deadlocks, and every request completes."""
    server = Server(tmp_path, "--model", str(tiny_model), "--max-model-len", "4096", "--max-num-seqs", "64",
                    "--max-num-batched-tokens", "4096", "--max-concurrent-requests", "512")
    [engine] = spawned_children(psutil.Process(server.process.pid))
    rng = random.Random(0)

    def prompt(tokens: int) -> list[int]:
        return [rng.randrange(49152) for _ in range(tokens)]

    try:
        async def main() -> list[str]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                         limits=httpx.Limits(max_connections=300)) as ahttp:
                async def stream(prompt: list[int], max_tokens: int) -> str:
                    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
                    async with ahttp.stream("POST", "/v1/completions", json=body) as response:
                        lines = [line async for line in response.aiter_lines() if line]
                    return lines[-2]  # the last chunk, with the finish reason

                streams = [asyncio.create_task(stream(prompt(8), 400)) for _ in range(48)]
                await asyncio.sleep(1.0)  # under way
                engine.suspend()
                try:  # some 2 MB of requests for an engine that reads nothing
                    streams += [asyncio.create_task(stream(prompt(3000), 8)) for _ in range(64)]
                    await asyncio.sleep(1.5)
                    for _ in range(3):  # an event loop blocked on the engine's pipe would time out here
                        health = await ahttp.get("/health", timeout=2)
                        assert health.status_code == 200
                finally:
                    engine.resume()
                await asyncio.sleep(0.5)
                os.kill(server.process.pid, signal.SIGSTOP)
                try:  # the engine's outputs pile up; more long prompts wait in the listen queue
                    streams += [asyncio.create_task(stream(prompt(3000), 8)) for _ in range(64)]
                    await asyncio.sleep(2.0)
                finally:
                    os.kill(server.process.pid, signal.SIGCONT)
                return await asyncio.wait_for(asyncio.gather(*streams), timeout=120)

        finals = asyncio.run(main())
        assert len(finals) == 176 and all('"finish_reason":"length"' in last for last in finals), finals[:3]
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()


def test_a_burst_never_exceeds_the_concurrency_limit_and_every_exit_frees_its_slot(tmp_path):
    server = Server(tmp_path, "--max-concurrent-requests", "4")
    long = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 120,
            "ignore_eos": True}
    try:
        async def burst(stream: bool) -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as ahttp:
                responses = await asyncio.gather(
                    *(ahttp.post("/v1/chat/completions", json={**long, "stream": stream}) for _ in range(16)))
            return sorted(r.status_code for r in responses)

        assert asyncio.run(burst(stream=False)) == [200] * 4 + [429] * 12
        assert asyncio.run(burst(stream=True)) == [200] * 4 + [429] * 12

        http = httpx.Client(base_url=server.url, timeout=60)
        for _ in range(4):  # streams left early give their slots back
            with http.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as response:
                next(response.iter_lines())
        for _ in range(4):  # so do requests past their deadline
            timed_out = http.post("/v1/chat/completions", json=long, headers={"x-request-timeout": "0.3"})
            assert_error_shape(timed_out, 408)
        for _ in range(4):  # and non-streaming requests whose client gave up
            try:
                http.post("/v1/chat/completions", json=long, timeout=0.3)
            except httpx.TimeoutException:
                pass
        wait_until_idle(http, timeout=30)
        assert asyncio.run(burst(stream=False)) == [200] * 4 + [429] * 12
    finally:
        server.stop()
