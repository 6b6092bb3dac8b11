"""Does a busy engine freeze the API? /health latency while a burst of long prompts is handed over.

    .venv/bin/llamaserve serve --port 8000 --max-model-len 4096 &
    .venv/bin/python bench/probe_latency.py --url http://127.0.0.1:8000 --clients 64 --prompt-tokens 3500

--clients completions requests, each a distinct prompt of about --prompt-tokens tokens (max_tokens 1), are
sent at once while one probe asks for /health every --interval seconds, one at a time. The probe runs
for --duration seconds from the burst's start (the hand-over of the burst to the engine and a good part
of its prefill), then the clients still waiting are cancelled; it prints the probes' latency percentiles
and their worst case: a server whose event loop blocks on the engine shows it there.
"""

import argparse
import asyncio
import multiprocessing as mp
import random
import statistics
import time

import httpx

WORDS = ["river", "stone", "lamp", "orbit", "violet", "copper", "harbor", "meadow", "signal", "thread",
         "winter", "canyon", "pepper", "saddle", "marble", "tunnel", "falcon", "garden", "anchor", "ember"]


def prompt(i: int, words: int) -> str:
    rng = random.Random(i)  # distinct prompts: no prefix cache hits between clients
    return f"Request {i}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def probe(url: str, interval: float, duration: float, conn) -> None:
    """In a process of its own, so that sending the burst cannot delay a probe on this side."""
    latencies = []
    with httpx.Client(base_url=url, timeout=600) as http:
        end = time.monotonic() + duration
        while time.monotonic() < end:
            start = time.perf_counter()
            response = http.get("/health")
            latencies.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
            time.sleep(interval)
    conn.send(latencies)


async def main(args) -> None:
    limits = httpx.Limits(max_connections=args.clients + 8)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits) as http:
        # About one token per word with the default model; measured once so the report says what was sent.
        sample = prompt(0, args.prompt_tokens)
        tokens = (await http.post("/tokenize", json={"prompt": sample})).json()["count"]
        words = int(args.prompt_tokens * args.prompt_tokens / tokens)
        bodies = [{"prompt": prompt(i, words), "max_tokens": 1} for i in range(args.clients)]
        results_conn, probe_conn = mp.Pipe()
        prober = mp.get_context("spawn").Process(target=probe, args=(args.url, args.interval, args.duration + 1,
                                                                      probe_conn))
        prober.start()
        await asyncio.sleep(1)  # a baseline before the burst
        start = time.perf_counter()
        clients = [asyncio.create_task(http.post("/v1/completions", json=b)) for b in bodies]
        await asyncio.wait(clients, timeout=args.duration)
        elapsed = time.perf_counter() - start
        latencies = await asyncio.to_thread(results_conn.recv)
        prober.join()
        for task in clients:
            task.cancel()
        results = await asyncio.gather(*clients, return_exceptions=True)
    statuses = [r.status_code if isinstance(r, httpx.Response) else "cancelled" for r in results]
    ms = sorted(x * 1000 for x in latencies)
    print(f"{args.clients} clients x ~{args.prompt_tokens} prompt tokens, probed for {elapsed:.1f} s: "
          f"statuses {dict((s, statuses.count(s)) for s in set(statuses))}")
    print(f"/health probes: {len(ms)}; p50 {statistics.median(ms):.1f} ms, "
          f"p99 {ms[min(len(ms) - 1, int(len(ms) * 0.99))]:.1f} ms, max {ms[-1]:.1f} ms, "
          f"over 100 ms: {sum(x > 100 for x in ms)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=3500)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--duration", type=float, default=45)
    parser.add_argument("--timeout", type=float, default=600)
    asyncio.run(main(parser.parse_args()))
