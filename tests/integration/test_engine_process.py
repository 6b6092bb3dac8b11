"""The engine core in its own process, driven through the asyncio client."""

import asyncio
import os
import signal
import time
from dataclasses import replace

import pytest

from llamaserve.config import EngineConfig
from llamaserve.engine.client import AsyncEngineClient, EngineDeadError
from llamaserve.engine.core import EngineCore
from llamaserve.engine.messages import AddRequest
from llamaserve.sampling_params import SamplingParams
from tests.conftest import make_tiny_checkpoint

OPTIONS = dict(num_blocks=128, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 40)), [200, 100, 50]]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), max_position_embeddings=256)
    return EngineConfig.from_options(model=str(path), **OPTIONS)


async def collect(client, request_id, prompt, params):
    outputs = [o async for o in client.generate(request_id, prompt, params)]
    return [t for o in outputs for t in o.new_token_ids], outputs[-1]


def test_concurrent_requests_match_in_process_engine(config):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    core = EngineCore(config)
    expected = []
    for i, prompt in enumerate(PROMPTS):
        core.add_request(AddRequest(str(i), prompt, params))
        tokens = []
        while core.has_work():
            tokens += [t for o in core.step() for t in o.new_token_ids]
        expected.append(tokens)

    async def main():
        client = await AsyncEngineClient.start(config)
        try:
            results = await asyncio.gather(*(collect(client, str(i), p, params) for i, p in enumerate(PROMPTS)))
            bad = await collect(client, "bad", [1, 2, 100000], params)
            return results, bad, client.is_alive
        finally:
            client.shutdown()

    results, bad, alive = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    assert all(last.finish_reason == "length" and last.num_prompt_tokens > 0 for _, last in results)
    assert bad[1].finish_reason == "error" and "token ids" in bad[1].error
    assert alive


def test_leaving_a_stream_early_aborts_the_request(config):
    async def main():
        client = await AsyncEngineClient.start(config)
        try:
            stream = client.generate("long", PROMPTS[1], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
            async for output in stream:
                if output.new_token_ids:
                    break
            await stream.aclose()  # as when the HTTP client disconnects
            # The engine keeps serving (its idle integrity check would kill it on a leak).
            tokens, last = await collect(client, "next", PROMPTS[0], SamplingParams(temperature=0, max_tokens=3))
            await asyncio.sleep(0.2)
            return len(tokens), last.finish_reason, client.is_alive, client.stats.num_running
        finally:
            client.shutdown()

    assert asyncio.run(main()) == (3, "length", True, 0)


def test_engine_death_fails_pending_requests_fast(config):
    # Room for long generations, so the requests are surely still running when the engine dies.
    config = replace(config, cache=replace(config.cache, num_blocks=8192),
                     scheduler=replace(config.scheduler, max_model_len=8192))
    params = SamplingParams(temperature=0, max_tokens=8000, ignore_eos=True)

    async def main():
        client = await AsyncEngineClient.start(config)
        streaming = asyncio.Event()

        async def consume(request_id):
            async for output in client.generate(request_id, [5, 6, 7], params):
                if output.new_token_ids:
                    streaming.set()

        try:
            tasks = [asyncio.create_task(consume(str(i))) for i in range(3)]
            await asyncio.wait_for(streaming.wait(), timeout=30)
            os.kill(client.process.pid, signal.SIGKILL)
            killed = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=5)
            elapsed = time.monotonic() - killed
            with pytest.raises(EngineDeadError):
                await collect(client, "after", [5, 6], params)
            return results, elapsed, client.is_alive
        finally:
            client.shutdown()

    results, elapsed, alive = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) for r in results), results
    assert elapsed < 5 and not alive
