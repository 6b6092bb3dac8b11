"""Many streams at once, and clients that leave: their engine requests are aborted at once."""

import asyncio
import time

import httpx
import openai

PROMPTS = ["Name a color.", "What is 2 + 2?", "Say hello in French.", "Name a planet."]
GREEDY = dict(temperature=0, max_tokens=8)
LONG = dict(messages=[{"role": "user", "content": "Tell me a very long story."}], max_tokens=1800, ignore_eos=True)


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def test_16_concurrent_streams_match_their_text_alone(client, server, model):
    alone = [client.chat.completions.create(model=model, messages=chat(p), **GREEDY).choices[0].message.content
             for p in PROMPTS]

    async def stream(aclient: openai.AsyncOpenAI, prompt: str) -> str:
        chunks = await aclient.chat.completions.create(model=model, messages=chat(prompt), stream=True, **GREEDY)
        return "".join([c.choices[0].delta.content or "" async for c in chunks])

    async def all_at_once() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as aclient:
            return await asyncio.gather(*(stream(aclient, PROMPTS[i % 4]) for i in range(16)))

    texts = asyncio.run(all_at_once())
    assert texts == [alone[i % 4] for i in range(16)]


def wait_until_idle(http: httpx.Client, timeout: float) -> float:
    """Seconds until the engine runs no request; fails after `timeout`."""
    start = time.monotonic()
    while (health := http.get("/health").json())["num_running"] or health["num_waiting"]:
        assert time.monotonic() - start < timeout, f"engine still busy: {health}"
        time.sleep(0.02)
    return time.monotonic() - start


def test_disconnect_mid_stream_aborts_the_request(server, http, client, model):
    with httpx.Client(base_url=server.url, timeout=60) as leaving:
        with leaving.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            while '"delta":{"content"' not in next(lines):  # until the first text arrives
                pass
            assert http.get("/health").json()["num_running"] == 1
    wait_until_idle(http, timeout=5.0)  # 1,800 tokens would take minutes
    after = client.chat.completions.create(model=model, messages=chat(PROMPTS[0]), max_tokens=2)
    assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == 2


def test_disconnect_while_waiting_for_a_non_streaming_response_aborts_it(server, http):
    try:
        httpx.post(f"{server.url}/v1/chat/completions", json=LONG, timeout=1.5)
        raise AssertionError("1800 tokens should take longer than 1.5 s")
    except httpx.ReadTimeout:
        pass  # httpx closes the connection
    wait_until_idle(http, timeout=5.0)  # 1,800 tokens would take minutes
