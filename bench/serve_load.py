"""Load on a running server: N streaming chat requests at a fixed concurrency, as one client.

    .venv/bin/llamaserve serve --port 8000 &
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --requests 64 --concurrency 16

Every request asks for exactly --max-tokens tokens (ignore_eos) at temperature 0. Output tokens/s =
all streamed tokens / wall seconds; TTFT and inter-token latency are measured at the client.
"""

import argparse
import asyncio
import json
import statistics
import time

import httpx

TOPICS = ["the history of lighthouses", "how bread rises", "the water cycle", "why the sky is blue",
          "the rules of chess", "how a bicycle stays upright", "the life of bees", "volcanoes"]


async def one_request(http: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> tuple[float, list[float], int]:
    body = {"model": model, "messages": [{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return arrivals[0] - start, [b - a for a, b in zip(arrivals, arrivals[1:])], tokens


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    async with httpx.AsyncClient(base_url=args.url, timeout=600) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        await one_request(http, model, 0, 4)  # warm-up
        slots = asyncio.Semaphore(args.concurrency)

        async def limited(i):
            async with slots:
                return await one_request(http, model, i, args.max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(args.requests)))
        seconds = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    ttft = sorted(r[0] for r in results)
    itl = sorted(gap for r in results for gap in r[1])
    print(f"{args.requests} requests x {args.max_tokens} tokens at concurrency {args.concurrency}: "
          f"{tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} output tok/s")
    print(f"TTFT p50 {statistics.median(ttft) * 1000:.0f} ms, p99 {ttft[int(0.99 * (len(ttft) - 1))] * 1000:.0f} ms; "
          f"inter-token p50 {statistics.median(itl) * 1000:.1f} ms, p99 {itl[int(0.99 * (len(itl) - 1))] * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
