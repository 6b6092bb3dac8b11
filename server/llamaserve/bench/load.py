"""The load: streamed requests at a fixed concurrency, or arriving as a Poisson process at a request rate,
each one timed at the client as its text arrives.

Every request streams (`stream: true`, with `stream_options.include_usage` so the server's own token counts
are used where it gives them), asks for its prompt's output length as `max_tokens`, and with `ignore_eos`
(sent unless turned off; vLLM, llama.cpp and llamaserve honour it) keeps generating to that length, so
servers compared do the same work. A server that ignores the field stops at its EOS; the summary's
output_tokens against expected_output_tokens shows it.
"""

import asyncio
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx

from llamaserve.bench.prompts import PromptSpec
from llamaserve.bench.summary import RequestRecord, summarize

RESULT_VERSION = 1


@dataclass(frozen=True)
class Target:
    """The server under load and what every request asks of it."""

    url: str  # base URL: the OpenAI routes are under {url}/v1
    model: str
    endpoint: str = "chat"  # "chat": /v1/chat/completions; "completions": /v1/completions
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout: float = 600.0  # seconds one request may take

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, spec: PromptSpec) -> dict:
        body = {"model": self.model, "max_tokens": spec.output_tokens, "temperature": self.temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            return {**body, "messages": [{"role": "user", "content": spec.prompt}]}
        return {**body, "prompt": spec.prompt}

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


def client_for(target: Target, max_connections: int | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=target.url.rstrip("/"), headers=target.headers,
                             timeout=httpx.Timeout(target.timeout, connect=30.0),
                             limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=None))


def served_model(url: str, api_key: str | None, timeout: float = 30.0) -> str:
    """The first model the server lists at /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=timeout)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _error_message(status: int, body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")
    return f"HTTP {status}: {message.strip()[:160]}"


async def send(client: httpx.AsyncClient, target: Target, spec: PromptSpec, index: int,
               start_of_point: float) -> RequestRecord:
    """One streamed request, timed; a failure is recorded, never raised."""
    start = time.perf_counter()
    record = RequestRecord(index=index, start_s=start - start_of_point, input_tokens=spec.input_tokens,
                           expected_output_tokens=spec.output_tokens)
    chunks, usage_tokens, last = 0, None, None
    try:
        async with client.stream("POST", target.path, json=target.body(spec)) as response:
            record.status = response.status_code
            if response.status_code != 200:
                record.error = _error_message(response.status_code, await response.aread())
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank lines between events, keep-alive comments
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = _error_message(200, data.encode())
                    return record
                if chunk.get("usage"):
                    record.input_tokens = chunk["usage"]["prompt_tokens"]
                    usage_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if target.endpoint == "chat" else choice.get("text")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            record.ttft_s = now - start
                        else:
                            record.itl_s.append(now - last)
                        last, chunks = now, chunks + 1
        record.e2e_s = time.perf_counter() - start
        record.output_tokens = usage_tokens if usage_tokens is not None else chunks
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        record.error = f"{type(e).__name__}: {e}"[:200]
    return record


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of `count` requests arriving as a Poisson process of `rate` per
    second: exponential gaps, seeded. An infinite rate sends them all at once."""
    if rate == float("inf"):
        return [0.0] * count
    rng, now, times = random.Random(seed), 0.0, []
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(rate)
    return times


async def run_concurrency(target: Target, specs: list[PromptSpec], concurrency: int,
                          on_done: Callable[[RequestRecord], None]) -> tuple[list[RequestRecord], float]:
    """`concurrency` requests in flight at all times, until every spec is sent."""
    records: list[RequestRecord | None] = [None] * len(specs)
    pending = iter(range(len(specs)))
    async with client_for(target, concurrency) as client:
        start = time.perf_counter()

        async def worker() -> None:
            for i in pending:  # one shared iterator: each index is taken once
                records[i] = await send(client, target, specs[i], i, start)
                on_done(records[i])

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(specs)))))
        return records, time.perf_counter() - start


async def run_rate(target: Target, specs: list[PromptSpec], rate: float, seed: int, max_concurrency: int | None,
                   on_done: Callable[[RequestRecord], None]) -> tuple[list[RequestRecord], float]:
    """Requests sent at Poisson arrival times, whatever is still in flight (at most `max_concurrency`)."""
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with client_for(target, max_concurrency) as client:
        start = time.perf_counter()

        async def arrive(i: int, at: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            if gate is None:
                record = await send(client, target, specs[i], i, start)
            else:
                async with gate:
                    record = await send(client, target, specs[i], i, start)
            on_done(record)
            return record

        arrivals = poisson_arrivals(len(specs), rate, seed)
        records = await asyncio.gather(*(arrive(i, at) for i, at in enumerate(arrivals)))
        return list(records), time.perf_counter() - start


async def warm_up(target: Target, specs: list[PromptSpec]) -> None:
    """Short requests first, so one-time costs (connections, compiled kernels) stay out of the figures."""
    async with client_for(target, 1) as client:
        for spec in specs:
            await send(client, target, PromptSpec(spec.prompt, spec.input_tokens, 4), 0, time.perf_counter())


def run_sweep(target: Target, point_specs: list[list[PromptSpec]], warmup_specs: list[PromptSpec], kind: str,
              values: list[float], seed: int = 0, max_concurrency: int | None = None, progress: bool = True,
              label: str | None = None, report: Callable[[dict], None] = lambda point: None) -> dict:
    """Each concurrency (kind "concurrency") or request rate (kind "request_rate") in `values` in turn, the
    i-th sending `point_specs[i]`, after the warm-up; the result as `llamaserve bench` writes it: the run's
    settings, then per point its summary and records. `report(point)` is called as each point finishes."""
    from tqdm import tqdm

    asyncio.run(warm_up(target, warmup_specs))
    points = []
    for value, specs in zip(values, point_specs):
        name = f"concurrency {int(value)}" if kind == "concurrency" else f"{value:g} req/s"
        with tqdm(total=len(specs), desc=name, unit="req", disable=not progress, leave=False) as bar:
            def on_done(record: RequestRecord) -> None:
                bar.update(1)

            if kind == "concurrency":
                records, duration = asyncio.run(run_concurrency(target, specs, int(value), on_done))
            else:
                records, duration = asyncio.run(run_rate(target, specs, value, seed, max_concurrency, on_done))
        point = {"concurrency": int(value) if kind == "concurrency" else max_concurrency,
                 "request_rate": _json_number(value) if kind == "request_rate" else None,
                 "summary": summarize(records, duration),
                 # This machine's 1-minute load average as the point ends: a benchmark beside a busy neighbour
                 # (or with the server on the same cores) shows it.
                 "load_average": round(os.getloadavg()[0], 2),
                 "records": [r.to_json() for r in records]}
        points.append(point)
        report(point)
    return {
        "version": RESULT_VERSION,
        "label": label or f"{target.model} at {target.url}",
        "url": target.url, "model": target.model, "endpoint": target.endpoint, "ignore_eos": target.ignore_eos,
        "temperature": target.temperature, "seed": seed, "requests_per_point": len(point_specs[0]), "cpu_count": os.cpu_count(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sweep": {"kind": kind, "values": [_json_number(v) for v in values], "max_concurrency": max_concurrency},
        "points": points,
    }


def _json_number(value: float) -> float | str:
    """JSON has no infinity: an infinite request rate (all at once) is written "inf"."""
    return "inf" if value == float("inf") else value


def point_line(point: dict, kind: str) -> str:
    """One line of a point's summary, for the terminal."""
    s = point["summary"]

    def ms(dist: dict, q: str) -> str:
        return "-" if dist[q] is None else f"{dist[q]:.0f}"

    where = f"concurrency {point['concurrency']}" if kind == "concurrency" else f"{point['request_rate']} req/s"
    return (f"{where}: {s['completed']}/{s['requests']} ok, {s['output_throughput']:.1f} output tok/s, "
            f"{s['request_throughput']:.2f} req/s; TTFT p50/p99 {ms(s['ttft_ms'], 'p50')}/{ms(s['ttft_ms'], 'p99')} ms, "
            f"ITL {ms(s['itl_ms'], 'p50')}/{ms(s['itl_ms'], 'p99')} ms, TPOT {ms(s['tpot_ms'], 'p50')}/"
            f"{ms(s['tpot_ms'], 'p99')} ms, E2E {ms(s['e2e_ms'], 'p50')}/{ms(s['e2e_ms'], 'p99')} ms; "
            f"load average {point['load_average']}")
