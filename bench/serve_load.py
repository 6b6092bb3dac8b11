"""Load on a running server: N streaming chat requests at a fixed concurrency, as one client.

    .venv/bin/llamaserve serve --port 8000 &
    .venv/bin/python bench/serve_load.py --url http://127.0.0.1:8000 --requests 64 --concurrency 16

Every request asks for exactly --max-tokens tokens (ignore_eos) at temperature 0. Output tokens/s =
all streamed tokens / wall seconds; TTFT and inter-token latency are measured at the client.

Structured output's cost: `--json-schema FILE` constrains every request by that schema (response_format
json_schema); ignore_eos cannot combine with a grammar, so give a schema whose output is longer than
--max-tokens (bench/long_schema.json: an array of at least 64 objects) and every request still streams
exactly --max-tokens tokens, as the unconstrained run does.

Tracing overhead: serve with `--otlp-traces-endpoint http://127.0.0.1:4318/v1/traces` and run this with
`--traceparent --otlp-sink 4318`: every request then carries a W3C traceparent (as from a tracing load
balancer) and the spans the server exports are received and counted here.
"""

import argparse
import asyncio
import json
import secrets
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

TOPICS = ["the history of lighthouses", "how bread rises", "the water cycle", "why the sky is blue",
          "the rules of chess", "how a bicycle stays upright", "the life of bees", "volcanoes"]


class OTLPSink:
    """An OTLP/HTTP receiver on 127.0.0.1 that counts the spans a traced server exports to it."""

    def __init__(self, port: int):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        sink = self
        self.spans = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
                sink.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    async def wait_for(self, spans: int, timeout: float) -> int:
        """The spans received once `spans` arrived or `timeout` passed (the exporter sends every few seconds)."""
        deadline = time.monotonic() + timeout
        while self.spans < spans and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.spans


async def one_request(http: httpx.AsyncClient, model: str, i: int, max_tokens: int,
                      traceparent: bool = False, schema: dict | None = None) -> tuple[float, list[float], int]:
    body = {"model": model, "messages": [{"role": "user", "content": f"Write about {TOPICS[i % len(TOPICS)]}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if schema is None:
        body["ignore_eos"] = True
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    headers = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"} if traceparent else {}
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
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
    parser.add_argument("--no-keep-alive", action="store_true",
                        help="a new connection per request (llama.cpp's llama-server closes each after its stream)")
    parser.add_argument("--models", help="comma-separated models (e.g. LoRA adapters) the requests take in turn "
                        "(default: the first the server lists)")
    parser.add_argument("--json-schema", metavar="FILE", help="constrain every request by this JSON Schema")
    parser.add_argument("--traceparent", action="store_true", help="send a fresh W3C traceparent with each request")
    parser.add_argument("--otlp-sink", type=int, metavar="PORT",
                        help="receive and count the server's OTLP/HTTP spans on 127.0.0.1:PORT")
    args = parser.parse_args()
    sink = OTLPSink(args.otlp_sink) if args.otlp_sink else None
    schema = json.loads(open(args.json_schema).read()) if args.json_schema else None
    limits = httpx.Limits(max_keepalive_connections=0) if args.no_keep_alive else httpx.Limits()
    async with httpx.AsyncClient(base_url=args.url, timeout=600, limits=limits) as http:
        models = args.models.split(",") if args.models else [(await http.get("/v1/models")).json()["data"][0]["id"]]
        for model in models:
            await one_request(http, model, 0, 4, schema=schema)  # warm-up (an adapter's first load, the grammar)
        slots = asyncio.Semaphore(args.concurrency)

        async def limited(i):
            async with slots:
                return await one_request(http, models[i % len(models)], i, args.max_tokens, args.traceparent, schema)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(args.requests)))
        seconds = time.perf_counter() - start
        if sink is not None:  # the warm-up request's span too
            print(f"spans received: {await sink.wait_for(args.requests + 1, timeout=15)} "
                  f"(of {args.requests + 1} requests)")
    tokens = sum(r[2] for r in results)
    ttft = sorted(r[0] for r in results)
    itl = sorted(gap for r in results for gap in r[1])
    print(f"{args.requests} requests x {args.max_tokens} tokens at concurrency {args.concurrency}: "
          f"{tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} output tok/s")
    print(f"TTFT p50 {statistics.median(ttft) * 1000:.0f} ms, p99 {ttft[int(0.99 * (len(ttft) - 1))] * 1000:.0f} ms; "
          f"inter-token p50 {statistics.median(itl) * 1000:.1f} ms, p99 {itl[int(0.99 * (len(itl) - 1))] * 1000:.1f} ms")


if __name__ == "__main__":
    asyncio.run(main())
